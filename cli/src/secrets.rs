//! `longrun secrets`: a user's secrets for an extension, in Secrets Manager — or, with
//! `--local`, in the dev stack's `0600` secrets file (no running stack needed). Values are read
//! from standard input, never from the command line (which shells keep in their history and
//! `ps` shows to everyone).

use std::io::Read;

use clap::{Args, Subcommand};
use longrun::Secret;

use crate::cli::{AwsArgs, Failure};

/// The subcommands of `longrun secrets`.
#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// Set NAME for (ext, user) to the value on stdin: `printf %s "$KEY" | longrun secrets set …`.
    Set(SecretArgs),
    /// Delete NAME for (ext, user).
    Delete(SecretArgs),
}

/// The arguments of `longrun secrets set` and `longrun secrets delete`.
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

/// The secret value on stdin, without the newline `echo` adds. At a terminal, one line.
fn value_from_stdin() -> Result<Secret, Failure> {
    use std::io::IsTerminal;
    let mut value = String::new();
    if std::io::stdin().is_terminal() {
        eprint!("value (one line, then Enter): ");
        std::io::stdin().read_line(&mut value)?;
    } else {
        std::io::stdin().read_to_string(&mut value)?;
    }
    let value = value.strip_suffix('\n').unwrap_or(&value);
    let value = value.strip_suffix('\r').unwrap_or(value);
    if value.is_empty() {
        return Err(Failure::Other("no secret value on stdin".into()));
    }
    Ok(Secret::new(value))
}

/// Sets (from stdin) or deletes one user's secret, in Secrets Manager or, with `--local`, in
/// the dev stack's secrets file.
pub async fn run(aws: &AwsArgs, command: SecretsCommand) -> Result<(), Failure> {
    if aws.local {
        return run_local(aws, command);
    }
    let clients = crate::aws::clients(aws).await?;
    match command {
        SecretsCommand::Set(args) => {
            let value = value_from_stdin()?;
            longrun_aws::secrets::put_secret(
                &clients.secrets,
                &args.secrets_prefix,
                &args.ext,
                &args.user,
                &args.name,
                &value,
            )
            .await?;
            eprintln!("set {} for {}/{}", args.name, args.ext, args.user);
        }
        SecretsCommand::Delete(args) => {
            let existed = longrun_aws::secrets::delete_secret(
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

/// `--local`: the dev stack's secrets file, which the running stack reads at each use.
fn run_local(aws: &AwsArgs, command: SecretsCommand) -> Result<(), Failure> {
    let file = longrun_dev::state::secrets_file(&aws.state_dir);
    let secrets = longrun_dev::secrets::LocalSecrets::new(&file);
    match command {
        SecretsCommand::Set(args) => {
            let value = value_from_stdin()?;
            longrun_dev::state::create_state_dir(&aws.state_dir)?;
            secrets.set(&args.ext, &args.user, &args.name, &value)?;
            eprintln!(
                "set {} for {}/{} in {}",
                args.name,
                args.ext,
                args.user,
                file.display()
            );
        }
        SecretsCommand::Delete(args) => {
            if !secrets.delete(&args.ext, &args.user, &args.name)? {
                return Err(Failure::NotFound(format!(
                    "no secret {} for {}/{} in {}",
                    args.name,
                    args.ext,
                    args.user,
                    file.display()
                )));
            }
            eprintln!(
                "deleted {} for {}/{} from {}",
                args.name,
                args.ext,
                args.user,
                file.display()
            );
        }
    }
    Ok(())
}
