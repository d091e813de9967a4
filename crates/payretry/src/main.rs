use clap::Parser;
use payretry::cli::{self, Cli};
use payretry::config::Config;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    #[cfg(feature = "failpoints")]
    let _crash_points = fail::FailScenario::setup();
    let cli = Cli::parse();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("payretry: configuration error: {error}");
            return ExitCode::from(2);
        }
    };
    match cli::run(cli, config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => match error.downcast_ref::<payretry::config::ConfigError>() {
            Some(bad_setting) => {
                eprintln!("payretry: configuration error: {bad_setting}");
                ExitCode::from(2)
            }
            None => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        },
    }
}
