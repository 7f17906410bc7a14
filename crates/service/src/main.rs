//! The `routing-service` command line: `serve` (the default), `token` and
//! `config`.
//!
//! Exit codes: 0 on success, 1 when the server fails, 2 on a usage or
//! configuration error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use routing_service::config::{Config, ConfigError};
use routing_service::{auth, server, telemetry};

/// Routes end-to-end encrypted envelopes between users over HTTP and
/// WebSocket.
#[derive(Debug, Parser)]
#[command(name = "routing-service", version)]
struct Cli {
    /// YAML file whose keys override the embedded defaults.
    #[arg(long, global = true, env = "ROUTING_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the servers that `roles` names until SIGINT or SIGTERM (the default).
    Serve,
    /// Print an HS256 token signed with JWT_SECRET, for trying the service.
    Token {
        /// The user id to put in `sub`.
        #[arg(long, value_name = "ID")]
        user: String,
        /// How long the token is valid, such as 30m, 1h or 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Print the effective configuration as YAML, with secrets masked.
    Config,
}

/// The exit code of usage and configuration errors, as clap uses.
const USAGE_ERROR: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match load_config(&cli) {
        Ok(config) => config,
        Err(err) => return usage_error(&err),
    };

    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config),
        Command::Token { user, ttl } => print_token(&config, &user, ttl),
        Command::Config => {
            print!("{}", config.to_masked_yaml());
            ExitCode::SUCCESS
        }
    }
}

fn load_config(cli: &Cli) -> Result<Config, ConfigError> {
    let env = routing_service::config::process_env()?;
    Config::load(cli.config.as_deref(), env)
}

fn usage_error(message: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(USAGE_ERROR)
}

fn print_token(config: &Config, user: &str, ttl: Duration) -> ExitCode {
    let Some(secret) = &config.jwt_secret else {
        return usage_error(&"JWT_SECRET is not set; set it in the environment to sign tokens");
    };
    if ttl.is_zero() {
        return usage_error(&"--ttl is 0; give a duration above zero, such as 1h");
    }
    match auth::mint_hs256(&secret.0, user, ttl) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(auth::AuthError::Invalid(reason)) => usage_error(&reason),
        Err(err) => usage_error(&err),
    }
}

fn serve(config: Config) -> ExitCode {
    telemetry::init_logging(config.log.format);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!(error = %err, "cannot start the Tokio runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(server::serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "server failed");
            ExitCode::FAILURE
        }
    }
}
