//! The process's TLS: which roots each HTTPS client trusts, and when they are loaded. A cold
//! start reads no certificate file.
//!
//! - **reqwest** (the chat API, `ctx.http`, the extension's model calls): one rustls
//!   configuration per process over the Mozilla roots compiled into the binary
//!   (`webpki-roots`), which need no parsing. Every reqwest client of the process shares it.
//!   With `SSL_CERT_FILE` or `SSL_CERT_DIR` set, reqwest trusts the platform's roots instead,
//!   as it did before (read when the client is built), so a private CA added that way reaches
//!   the model and chat APIs as it reaches AWS.
//! - **the AWS SDK**: the HTTPS client aws-config builds by default (rustls on aws-lc, the
//!   platform's roots, `HTTPS_PROXY` honoured), one for the three SDK clients, whose roots are
//!   read and parsed at its first request. Left to itself the SDK builds one per client and
//!   loads the roots for each as the client is built, at cold start. It cannot share reqwest's
//!   configuration: its HTTPS client takes no rustls configuration in its stable API.
//!
//! Why it matters: reading and parsing the CA bundle three times was most of intake's and the
//! worker's init (`cargo bench -p longrun-tests --bench cold_start`).

use std::sync::{Arc, LazyLock};

use aws_smithy_http_client::proxy::ProxyConfig;
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use aws_smithy_http_client::{Builder, ConnectorBuilder};
use aws_smithy_runtime_api::client::connector_metadata::ConnectorMetadata;
use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnectorSettings, SharedHttpClient, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;

/// The variables that point TLS libraries at a CA bundle or directory.
pub const PLATFORM_ROOTS_VARS: [&str; 2] = ["SSL_CERT_FILE", "SSL_CERT_DIR"];

/// reqwest's rustls configuration: the compiled-in roots, HTTP/1.1 by ALPN (what reqwest
/// offers by itself without HTTP/2), built once per process.
static COMPILED_IN: LazyLock<Result<rustls::ClientConfig, String>> = LazyLock::new(|| {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
});

/// A reqwest client on the process's TLS configuration (see the module docs). Cheap: the
/// configuration is built once and shared; each client has its own connection pool.
pub fn http_client() -> reqwest::Client {
    if platform_roots_requested(|name| std::env::var_os(name)) {
        return reqwest::Client::new();
    }
    match compiled_in_client() {
        Ok(client) => client,
        Err(reason) => {
            tracing::warn!(%reason, "no TLS configuration over the compiled-in roots; using the platform's");
            reqwest::Client::new()
        }
    }
}

/// Whether `lookup` names a CA bundle or directory ([`PLATFORM_ROOTS_VARS`], not empty).
fn platform_roots_requested(lookup: impl Fn(&str) -> Option<std::ffi::OsString>) -> bool {
    PLATFORM_ROOTS_VARS
        .iter()
        .any(|name| lookup(name).is_some_and(|v| !v.is_empty()))
}

/// A reqwest client over the compiled-in roots.
fn compiled_in_client() -> Result<reqwest::Client, String> {
    let config = COMPILED_IN.as_ref().map_err(Clone::clone)?.clone();
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .build()
        .map_err(|e| e.to_string())
}

/// The AWS SDK's HTTPS client for every SDK client of the process (see the module docs).
pub fn sdk_http_client() -> SharedHttpClient {
    // What aws-config builds when given none (aws-smithy-runtime's `default_https_client` at
    // the latest behaviour version), so requests go out exactly as before.
    let https = Builder::new().build_with_connector_fn(|settings, components| {
        let mut connector = ConnectorBuilder::default()
            .tls_provider(Provider::Rustls(CryptoMode::AwsLc))
            .proxy_config(ProxyConfig::from_env());
        connector.set_connector_settings(settings.cloned());
        if let Some(components) = components {
            connector.set_sleep_impl(components.sleep_impl());
        }
        connector.build()
    });
    SharedHttpClient::new(RootsAtFirstRequest(https))
}

/// An HTTP client that skips the eager connector the SDK's hyper client builds when an SDK
/// client is constructed — built only to load the TLS roots early, at cold start, once per
/// client. The connector, and the roots with it, come with the first request instead.
#[derive(Debug)]
struct RootsAtFirstRequest(SharedHttpClient);

impl HttpClient for RootsAtFirstRequest {
    fn http_connector(
        &self,
        settings: &HttpConnectorSettings,
        components: &RuntimeComponents,
    ) -> SharedHttpConnector {
        self.0.http_connector(settings, components)
    }

    fn connector_metadata(&self) -> Option<ConnectorMetadata> {
        self.0.connector_metadata()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use aws_sdk_dynamodb::config::{ConfigBag, RuntimeComponentsBuilder};
    use aws_smithy_runtime_api::box_error::BoxError;

    use super::*;

    /// Counts the SDK's eager checks of its HTTP client; never asked for a connector here.
    #[derive(Debug, Clone, Default)]
    struct CountingChecks(Arc<AtomicUsize>);

    impl HttpClient for CountingChecks {
        fn http_connector(
            &self,
            _: &HttpConnectorSettings,
            _: &RuntimeComponents,
        ) -> SharedHttpConnector {
            panic!("no request is sent in this test")
        }

        fn validate_base_client_config(
            &self,
            _: &RuntimeComponentsBuilder,
            _: &ConfigBag,
        ) -> Result<(), BoxError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn dynamodb_on(http: impl HttpClient + 'static) -> aws_sdk_dynamodb::Client {
        let config = aws_sdk_dynamodb::Config::builder()
            .behavior_version_latest()
            .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
            .http_client(http)
            .build();
        aws_sdk_dynamodb::Client::from_conf(config)
    }

    #[test]
    fn an_sdk_client_loads_no_roots_before_its_first_request() {
        // The SDK asks its HTTP client to check itself as each client is built: that is where
        // its hyper client builds a connector and loads the roots, at cold start.
        let checks = CountingChecks::default();
        dynamodb_on(checks.clone());
        assert_eq!(checks.0.load(Ordering::SeqCst), 1);
        // Ours skips that: nothing happens until a request needs the connector.
        let checks = CountingChecks::default();
        dynamodb_on(RootsAtFirstRequest(SharedHttpClient::new(checks.clone())));
        assert_eq!(checks.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn reqwest_takes_the_compiled_in_configuration() {
        // A rustls version reqwest does not share would make the configuration "unknown" and
        // the build fail (`http_client` would then fall back to the platform's roots).
        assert!(compiled_in_client().is_ok());
    }

    #[test]
    fn a_ca_bundle_variable_brings_back_the_platform_roots() {
        assert!(!platform_roots_requested(|_| None));
        assert!(!platform_roots_requested(|_| Some("".into())));
        assert!(platform_roots_requested(|name| {
            (name == "SSL_CERT_DIR").then(|| "/etc/pki/tls/certs".into())
        }));
    }
}
