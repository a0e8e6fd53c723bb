//! `longrun secrets`: a user's secrets for an extension, in Secrets Manager. Values are read
//! from standard input, never from the command line (which shells keep in their history and
//! `ps` shows to everyone).

use std::io::Read;

use clap::{Args, Subcommand};
use longrun::Secret;

use crate::cli::{AwsArgs, Failure};

#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// Set NAME for (ext, user) to the value on stdin: `printf %s "$KEY" | longrun secrets set …`.
    Set(SecretArgs),
    /// Delete NAME for (ext, user).
    Delete(SecretArgs),
}

#[derive(Debug, Args)]
pub struct SecretArgs {
    /// The extension, e.g. text-tools.
    #[arg(long)]
    pub ext: String,
    /// The user.
    #[arg(long)]
    pub user: String,
    /// The secret's name, e.g. openai_api_key.
    pub name: String,
    /// Where per-user secrets live.
    #[arg(long, env = "LONGRUN_SECRETS_PREFIX", default_value = "longrun")]
    pub secrets_prefix: String,
}

pub async fn run(aws: &AwsArgs, command: SecretsCommand) -> Result<(), Failure> {
    let clients = crate::aws::clients(aws).await;
    match command {
        SecretsCommand::Set(args) => {
            let mut value = String::new();
            std::io::stdin().read_to_string(&mut value)?;
            // `echo` adds a newline nobody means as part of a key.
            let value = value.strip_suffix('\n').unwrap_or(&value);
            let value = value.strip_suffix('\r').unwrap_or(value);
            if value.is_empty() {
                return Err(Failure::Other("no secret value on stdin".into()));
            }
            longrun::aws::secrets::put_secret(
                &clients.secrets,
                &args.secrets_prefix,
                &args.ext,
                &args.user,
                &args.name,
                &Secret::new(value),
            )
            .await?;
            eprintln!("set {} for {}/{}", args.name, args.ext, args.user);
        }
        SecretsCommand::Delete(args) => {
            let existed = longrun::aws::secrets::delete_secret(
                &clients.secrets,
                &args.secrets_prefix,
                &args.ext,
                &args.user,
                &args.name,
            )
            .await?;
            if !existed {
                return Err(Failure::NotFound(format!(
                    "no secret {} for {}/{}",
                    args.name, args.ext, args.user
                )));
            }
            eprintln!("deleted {} for {}/{}", args.name, args.ext, args.user);
        }
    }
    Ok(())
}
