//! AWS clients and the deployment's runtime, built from the global flags.

use longrun::aws::AwsClients;
use longrun::config::Config;
use longrun::{Runtime, Settings};

use crate::cli::{AwsArgs, Failure};

/// Clients for the flags: profile, region and endpoint override the environment.
pub async fn clients(args: &AwsArgs) -> AwsClients {
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
    AwsClients::new(&loader.load().await)
}

/// The deployment as `longrun bootstrap` described it (the LONGRUN_* variables), with the
/// reference extension registered so task ownership and cancel results read as they do in
/// the functions.
pub async fn deployment(args: &AwsArgs) -> Result<(Runtime, AwsClients, Config), Failure> {
    let config = Config::from_env()?;
    let clients = clients(args).await;
    let services = longrun::aws::services(&clients, &config, None);
    let rt = Runtime::new(text_tools::extension(), services, Settings::default());
    Ok((rt, clients, config))
}
