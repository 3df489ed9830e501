//! `berth-hub`: serves the REST and gRPC APIs over etcd and runs the (leader-elected) scheduler loop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use berth_hub::alerts::{self, DeliveryPolicy, Notifier};
use berth_hub::service::{NetConfig, Service, DEFAULT_SERVICE_CIDR, DEFAULT_TUNNEL_CIDR};
use berth_hub::store::Store;
use berth_hub::{api, reconciler};
use clap::{Parser, ValueEnum};
use ipnet::Ipv4Net;
use tokio::sync::watch;

/// berth's hub: REST + gRPC API over etcd, scheduler.
#[derive(Debug, Parser)]
#[command(name = "berth-hub", version)]
struct Args {
    /// etcd endpoints, comma-separated (e.g. http://127.0.0.1:2379,http://127.0.0.1:22379).
    #[arg(long, value_delimiter = ',', required = true)]
    etcd: Vec<String>,
    /// Address of the REST API.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen_api: SocketAddr,
    /// Address of the gRPC API (clients and agents).
    #[arg(long, default_value = "127.0.0.1:9090")]
    listen_grpc: SocketAddr,
    /// Scratch directory (created if missing); nothing authoritative lives here, all state is in etcd.
    #[arg(long, default_value = "/var/lib/berth/hub")]
    data_dir: PathBuf,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// How long to keep retrying etcd at start before giving up.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    etcd_wait: Duration,
    /// Range service (virtual) IPs are allocated from; the same on every hub replica. Network CIDRs
    /// may not overlap it.
    #[arg(long, default_value = DEFAULT_SERVICE_CIDR, value_parser = parse_range)]
    service_cidr: Ipv4Net,
    /// Range the nodes' WireGuard addresses are allocated from; the same on every hub replica.
    #[arg(long, default_value = DEFAULT_TUNNEL_CIDR, value_parser = parse_range)]
    tunnel_cidr: Ipv4Net,
    /// http(s) URL that receives alerts (NodeDown, InstanceCrashLooping, ProbeFailing) in the
    /// Alertmanager webhook format; repeat for several. Only the scheduling leader posts; after a
    /// leader change the new leader posts again what is firing.
    #[arg(long = "alert-webhook", value_name = "URL", value_parser = parse_webhook)]
    alert_webhooks: Vec<reqwest::Url>,
    /// How long an instance stays UNHEALTHY (failing its probe) before ProbeFailing fires.
    #[arg(
        long,
        default_value = "2m",
        value_name = "DURATION",
        value_parser = parse_user_duration
    )]
    alert_unhealthy_after: Duration,
    /// How long the event log (`GET /v1/events`, `berth events`) keeps events.
    #[arg(
        long,
        default_value = "1h",
        value_name = "DURATION",
        value_parser = parse_user_duration
    )]
    event_ttl: Duration,
}

fn parse_webhook(s: &str) -> Result<reqwest::Url, String> {
    alerts::parse_webhook_url(s).map_err(|e| e.to_string())
}

fn parse_user_duration(s: &str) -> Result<Duration, String> {
    berth_proto::duration::parse(s).map_err(|e| e.to_string())
}

fn parse_range(s: &str) -> Result<Ipv4Net, String> {
    berth_hub::ipam::parse_network_cidr(s).map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let secs = s.strip_suffix('s').unwrap_or(s);
    secs.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{s:?} is not a duration like \"5s\""))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(args.log_format);
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data dir {}", args.data_dir.display()))?;

    let store = Store::connect(&args.etcd, args.etcd_wait)
        .await
        .with_context(|| format!("etcd at {} is unreachable", args.etcd.join(",")))?;
    tracing::info!(etcd = %args.etcd.join(","), "connected to etcd");
    let net = NetConfig {
        service_cidr: args.service_cidr,
        tunnel_cidr: args.tunnel_cidr,
    };
    if args.event_ttl < Duration::from_secs(1) {
        anyhow::bail!("--event-ttl must be at least 1s");
    }
    let events = berth_hub::events::Events::new(
        store.clone(),
        berth_hub::events::EventsConfig {
            ttl: args.event_ttl,
            ..Default::default()
        },
    );
    let ca = berth_hub::ca::ClusterCa::load_or_create(&store)
        .await
        .context("cluster CA")?;
    let service = Service::with_config(store.clone(), net)
        .with_events(events.clone())
        .with_ca(std::sync::Arc::new(ca));

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };

    let api_listener = tokio::net::TcpListener::bind(args.listen_api)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen_api))?;
    let grpc_listener = tokio::net::TcpListener::bind(args.listen_grpc)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen_grpc))?;
    tracing::info!(api = %args.listen_api, grpc = %args.listen_grpc, "listening");

    let rest = axum::serve(api_listener, api::rest::router(service.clone()))
        .with_graceful_shutdown(stopped(stop_rx.clone()));
    let grpc = tonic::transport::Server::builder()
        .add_routes(api::grpc::routes(service.clone()))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
            stopped(stop_rx.clone()),
        );
    let notifier = Notifier::new(&args.alert_webhooks, DeliveryPolicy::default())
        .context("cannot set up alert webhooks")?;
    if !args.alert_webhooks.is_empty() {
        let targets: Vec<String> = args
            .alert_webhooks
            .iter()
            .map(|u| u.origin().ascii_serialization())
            .collect();
        tracing::info!(webhooks = %targets.join(","), "alerts are posted to webhooks");
    }
    let alerting = reconciler::Alerting {
        rules: alerts::AlertRules {
            unhealthy_after: args.alert_unhealthy_after,
            ..alerts::AlertRules::default()
        },
        notifier,
        events: Some(events),
    };
    let candidate = format!("{}@{}", hostname_or_pid(), args.listen_grpc);
    let scheduler =
        reconciler::run_with_alerting(store, candidate, net, alerting, stopped(stop_rx.clone()));

    let rest = tokio::spawn(async move { rest.await.context("REST server failed") });
    let grpc = tokio::spawn(async move { grpc.await.context("gRPC server failed") });
    let scheduler = tokio::spawn(scheduler);

    shutdown_signal().await?;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    // Event streams never end by themselves: end them so the graceful shutdown can finish.
    berth_hub::events::close_streams();
    rest.await??;
    grpc.await??;
    scheduler.await?;
    Ok(())
}

fn hostname_or_pid() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| format!("pid{}", std::process::id()))
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
