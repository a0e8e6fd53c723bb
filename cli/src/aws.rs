//! AWS clients and the deployment's runtime, built from the global flags: AWS as the profile,
//! region and endpoint say, or — with `--local` — the dev stack `longrun dev` runs.

use std::sync::Arc;

use longrun::config::Config;
use longrun::{Runtime, Settings};
use longrun_aws::AwsClients;

use crate::cli::{AwsArgs, Failure};
use longrun_dev::state::DevEndpoints;

/// Clients for the flags: profile, region and endpoint override the environment; `--local`
/// points them at the running dev stack.
pub async fn clients(args: &AwsArgs) -> Result<AwsClients, Failure> {
    if args.local {
        return Ok(DevEndpoints::running(&args.state_dir)
            .await?
            .clients()
            .await);
    }
    Ok(AwsClients::new(&sdk_config(args).await))
}

/// The SDK configuration for the flags (not `--local`).
pub async fn sdk_config(args: &AwsArgs) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(profile) = &args.profile {
        loader = loader.profile_name(profile);
    }
    if let Some(region) = &args.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(endpoint) = &args.endpoint_url {
        loader = loader.endpoint_url(endpoint);
    }
    loader.load().await
}

/// The deployment as `longrun bootstrap` described it (the LONGRUN_* variables), or the dev
/// stack's with `--local`. Operator commands need no extension: ownership, states and cancel
/// results are all in the stored task.
pub async fn deployment(args: &AwsArgs) -> Result<(Runtime, AwsClients, Config), Failure> {
    let (config, clients, local_secrets) = if args.local {
        let dev = DevEndpoints::running(&args.state_dir).await?;
        let secrets = longrun_dev::secrets::LocalSecrets::new(&dev.secrets_file);
        (dev.config(), dev.clients().await, Some(secrets))
    } else {
        (Config::from_env()?, clients(args).await?, None)
    };
    let mut services = longrun_aws::services(&clients, &config, None);
    if let Some(secrets) = local_secrets {
        services.secrets = Arc::new(secrets);
    }
    let rt = Runtime::new(services, Settings::default());
    Ok((rt, clients, config))
}
