//! `longrun dlq`: what is in the dead-letter queues, and sending it back once the cause is
//! fixed (a chat API that was down, a bug that was deployed away).

use clap::{Args, Subcommand, ValueEnum};

use crate::cli::{AwsArgs, Failure};

/// The subcommands of `longrun dlq`.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// The messages waiting in a dead-letter queue (they stay there).
    List(QueueArgs),
    /// Move the messages of a dead-letter queue back to its queue.
    Redrive(RedriveArgs),
}

/// Which dead-letter queue a command acts on.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Which {
    /// The work queue's dead-letter queue (`LONGRUN_WORK_DLQ_URL`).
    Work,
    /// The delivery queue's dead-letter queue (`LONGRUN_DELIVERY_DLQ_URL`).
    Delivery,
}

/// The arguments of `longrun dlq list`.
#[derive(Debug, Args)]
pub struct QueueArgs {
    /// The dead-letter queue to list.
    #[arg(value_enum, default_value = "delivery")]
    pub queue: Which,
    /// JSON for scripts instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The arguments of `longrun dlq redrive`.
#[derive(Debug, Args)]
pub struct RedriveArgs {
    /// The dead-letter queue to move back to its queue.
    #[arg(value_enum, default_value = "delivery")]
    pub queue: Which,
    /// Move at most this many messages.
    #[arg(long, default_value_t = 1000)]
    pub max: usize,
}

fn urls(config: &longrun::config::Config, which: Which) -> Result<(String, String), Failure> {
    let (dlq, main, var) = match which {
        Which::Work => (
            &config.work_dlq_url,
            &config.work_queue_url,
            longrun::config::vars::WORK_DLQ_URL,
        ),
        Which::Delivery => (
            &config.delivery_dlq_url,
            &config.delivery_queue_url,
            longrun::config::vars::DELIVERY_DLQ_URL,
        ),
    };
    let dlq = dlq
        .clone()
        .ok_or_else(|| Failure::Config(format!("environment variable {var} is not set")))?;
    Ok((dlq, main.clone()))
}

/// Lists the messages of a dead-letter queue (up to 10, left in place) or moves them back to
/// its queue.
pub async fn run(aws: &AwsArgs, command: DlqCommand) -> Result<(), Failure> {
    let (_, clients, config) = crate::aws::deployment(aws).await?;
    match command {
        DlqCommand::List(args) => {
            let (dlq, _) = urls(&config, args.queue)?;
            let depth = longrun_aws::sqs::depth(&clients.sqs, &dlq).await?;
            // Peek: a zero visibility timeout leaves each message visible for the next reader.
            let messages = longrun_aws::sqs::receive(&clients.sqs, &dlq, 10, 0, Some(0)).await?;
            if args.json {
                let rows: Vec<_> = messages
                    .iter()
                    .map(|m| serde_json::json!({"message_id": m.message_id, "receive_count": m.receive_count, "body": serde_json::from_str::<serde_json::Value>(&m.body).unwrap_or_else(|_| m.body.clone().into())}))
                    .collect();
                println!("{}", serde_json::json!({"depth": depth, "messages": rows}));
            } else {
                println!("{depth} message(s) in {dlq}");
                for m in messages {
                    println!(
                        "  {}  received {}×  {}",
                        m.message_id, m.receive_count, m.body
                    );
                }
            }
        }
        DlqCommand::Redrive(args) => {
            let (dlq, main) = urls(&config, args.queue)?;
            let moved = longrun_aws::sqs::redrive(&clients.sqs, &dlq, &main, args.max).await?;
            println!("{moved} message(s) moved back to {main}");
        }
    }
    Ok(())
}
