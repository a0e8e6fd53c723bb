//! `longrun usage`: a user's use of the extension's daily budgets (`ctx.charge`) — show it,
//! or reset it (a support gesture: the user may call again at once).

use chrono::NaiveDate;
use clap::{Args, Subcommand};

use crate::cli::{AwsArgs, Failure};

/// The subcommands of `longrun usage`.
#[derive(Debug, Subcommand)]
pub enum UsageCommand {
    /// What (ext, user) used of each meter on a day (today, UTC, by default).
    Show(UsageArgs),
    /// Forget what (ext, user) used on a day, of one meter or of all.
    Reset(ResetArgs),
}

/// The arguments of `longrun usage show`.
#[derive(Debug, Args)]
pub struct UsageArgs {
    /// The extension.
    #[arg(long)]
    pub ext: String,
    /// The user.
    #[arg(long)]
    pub user: String,
    /// The UTC day, YYYY-MM-DD (default: today).
    #[arg(long)]
    pub day: Option<NaiveDate>,
    /// JSON for scripts instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The arguments of `longrun usage reset`.
#[derive(Debug, Args)]
pub struct ResetArgs {
    /// The extension.
    #[arg(long)]
    pub ext: String,
    /// The user.
    #[arg(long)]
    pub user: String,
    /// Only this meter (default: every meter).
    #[arg(long)]
    pub meter: Option<String>,
    /// The UTC day, YYYY-MM-DD (default: today).
    #[arg(long)]
    pub day: Option<NaiveDate>,
}

/// Shows or resets a user's usage in the deployment's task table.
pub async fn run(aws: &AwsArgs, command: UsageCommand) -> Result<(), Failure> {
    let (rt, _, _) = crate::aws::deployment(aws).await?;
    let today = || chrono::Utc::now().date_naive();
    match command {
        UsageCommand::Show(args) => {
            let day = args.day.unwrap_or_else(today);
            let used = rt.services.usage.usage(&args.ext, &args.user, day).await?;
            if args.json {
                let json = serde_json::json!({"ext": args.ext, "user": args.user, "day": day.to_string(), "used": used});
                println!("{json}");
            } else if used.is_empty() {
                println!("{}/{} used nothing on {day}", args.ext, args.user);
            } else {
                println!("{:<24} {:>14}", "meter", "used");
                for (meter, amount) in &used {
                    println!("{meter:<24} {amount:>14}");
                }
            }
        }
        UsageCommand::Reset(args) => {
            let day = args.day.unwrap_or_else(today);
            rt.services
                .usage
                .reset(&args.ext, &args.user, day, args.meter.as_deref())
                .await?;
            eprintln!(
                "reset {} of {}/{} on {day}",
                args.meter.as_deref().unwrap_or("every meter"),
                args.ext,
                args.user
            );
        }
    }
    Ok(())
}
