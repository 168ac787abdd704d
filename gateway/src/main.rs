//! `gateway` binary: parses settings, sets up logging, binds, and runs the node.

use std::process::ExitCode;

use anyhow::Context;
use gateway::{Config, LogFormat};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let (config, check_only) = match Config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gateway: {e}");
            return ExitCode::from(2);
        }
    };
    if check_only {
        // Secrets, and the password in `redis_url`, print as `<redacted>`.
        println!("configuration OK\n{config:#?}");
        return ExitCode::SUCCESS;
    }
    init_logging(config.log_format);
    match serve(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding --listen {}", config.listen))?;
        let admin = tokio::net::TcpListener::bind(config.admin_listen)
            .await
            .with_context(|| format!("binding --admin-listen {}", config.admin_listen))?;
        let shutdown = CancellationToken::new();
        tokio::spawn(on_signal(shutdown.clone()));
        gateway::run(listener, admin, config, shutdown).await?;
        Ok(())
    })
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
async fn on_signal(shutdown: CancellationToken) {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = term => tracing::info!("SIGTERM: shutting down"),
    }
    shutdown.cancel();
}
