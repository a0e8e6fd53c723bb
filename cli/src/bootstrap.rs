//! `longrun bootstrap`: the table and the four queues, exactly as `template.yaml` defines
//! them, on any endpoint; prints the configuration for `export`.

use clap::Args;
use longrun::config::vars;

use crate::cli::{AwsArgs, Failure};

/// The arguments of `longrun bootstrap`.
#[derive(Debug, Args)]
pub struct BootstrapArgs {
    /// Name prefix of the queues (`{prefix}-work`, `{prefix}-delivery`, and their `-dlq`s).
    #[arg(long, default_value = "longrun")]
    pub prefix: String,
    /// Table name [default: {prefix}-tasks].
    #[arg(long)]
    pub table: Option<String>,
    /// Where per-user secrets live in Secrets Manager.
    #[arg(long, default_value = "longrun")]
    pub secrets_prefix: String,
}

/// Creates the table and the four queues where they are missing, and prints the deployment's
/// configuration as `KEY=value` lines (with `--local`, the dev stack's endpoints and region).
pub async fn run(aws: &AwsArgs, args: BootstrapArgs) -> Result<(), Failure> {
    let clients = crate::aws::clients(aws).await?;
    let table = args
        .table
        .unwrap_or_else(|| format!("{}-tasks", args.prefix));
    let created = longrun_aws::dynamodb::ensure_table(&clients.dynamodb, &table).await?;
    tracing::info!(%table, created, "table ready");
    let queues = longrun_aws::sqs::ensure_queues(&clients.sqs, &args.prefix).await?;
    tracing::info!(work = %queues.work, delivery = %queues.delivery, "queues ready");
    let mut lines = vec![
        (vars::TABLE, table),
        (vars::WORK_QUEUE_URL, queues.work),
        (vars::DELIVERY_QUEUE_URL, queues.delivery),
        (vars::WORK_DLQ_URL, queues.work_dlq),
        (vars::DELIVERY_DLQ_URL, queues.delivery_dlq),
        (vars::SECRETS_PREFIX, args.secrets_prefix),
    ];
    // Later commands (and the functions under `cargo lambda watch`) need the same endpoint.
    if aws.local {
        let dev = longrun_dev::state::DevEndpoints::running(&aws.state_dir).await?;
        lines.push(("AWS_ENDPOINT_URL_DYNAMODB", dev.dynamodb_endpoint));
        lines.push(("AWS_ENDPOINT_URL_SQS", dev.sqs_endpoint));
        lines.push(("AWS_REGION", dev.region));
    } else {
        if let Some(endpoint) = &aws.endpoint_url {
            lines.push(("AWS_ENDPOINT_URL", endpoint.clone()));
        }
        if let Some(region) = &aws.region {
            lines.push(("AWS_REGION", region.clone()));
        }
    }
    for (name, value) in lines {
        println!("{name}={value}");
    }
    Ok(())
}
