//! `cargo xtask bench migrate`: live migration of a program with N MiB resident that keeps
//! rewriting R MiB/s of it, per mode, on a private 3-node cluster (release binaries).
//!
//! The program (`bench_migrate_prog.c`, built with `gcc -static` at bench time and put into a
//! variant of the demo image) answers HTTP on port 80 with a sequence number, the longest gap it saw
//! between two of its own loop iterations (its pause) and the network namespace it runs in, which
//! changes when it is restored on the target. The same binary, run on the third node in the network
//! namespace of a small replica there (a client container, as far as the network goes), is the
//! client: it opens a connection every few ms without waiting for earlier ones, so the last answer
//! from the source and the first one from the target are told apart by the namespace they name.
//!
//! Per migration it prints the hub's job figures (rounds, bytes sent and their ratio to the resident
//! size, total time from `created_at` to `finished_at`, `downtime_ms`), the downtime a client saw
//! (last answer from the source → first answer from the target), the longest gap between two answers
//! the client saw anywhere during the job (pre-copy dumps freeze the program too), the program's
//! own longest pause, and, from the agents' logs, where the time went (per-round dump times, the
//! final dump, the restore). Each measurement deploys a fresh container and deletes it afterwards.

use anyhow::{bail, Context};
use berth_tests::api::{instances, placements};
use berth_tests::{Api, Cluster, Profile};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Options of `bench migrate`.
#[derive(clap::Args)]
pub struct MigrateArgs {
    /// Resident sizes of the test program, MiB.
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024")]
    sizes: Vec<u64>,
    /// Rates at which the program rewrites its memory, MiB/s.
    #[arg(long, value_delimiter = ',', default_value = "0,10,100")]
    rates: Vec<u64>,
    /// Migrations per size, rate and mode.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Modes to measure, as the hub names them; a mode the hub refuses is reported as such.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "auto,precopy,stopcopy,postcopy"
    )]
    modes: Vec<String>,
    /// How often the client asks the program, ms.
    #[arg(long, default_value_t = 5)]
    poll_ms: u64,
    /// How the client asks: "new" (a new connection every poll, without waiting for earlier ones:
    /// the first one after the switch shows when the target serves) or "keepalive" (one HTTP/1.1
    /// connection kept across the move: its gap also holds TCP's retransmission backoff for a
    /// request the freeze's traffic lock dropped).
    #[arg(long, default_value = "new", value_parser = ["keepalive", "new"])]
    client: String,
}

/// How long one migration may take before the bench gives up on it.
const JOB_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a deploy may take (the program touches all its memory before it serves).
const DEPLOY_TIMEOUT: Duration = Duration::from_secs(120);
/// The container's memory limit above the program's resident size (binary, stacks, page tables).
const LIMIT_SLACK_MIB: u64 = 64;
/// Where the program lives in the image.
const PROG_IN_IMAGE: &str = "/bin/migrate-prog";

/// One measured (or refused) migration.
struct Row {
    size: u64,
    rate: u64,
    mode: String,
    outcome: Outcome,
}

enum Outcome {
    /// The hub refused the mode (its message).
    Refused(String),
    /// Not run: the case does not fit this machine.
    Skipped(String),
    /// The job ran (COMPLETED or FAILED).
    Ran(Box<Measured>),
}

struct Measured {
    status: String,
    /// What the source ran it as (`auto`'s choice), with the write rate it measured.
    chosen_mode: String,
    write_rate_mib_s: Option<f64>,
    error: String,
    rounds: u64,
    bytes_sent: u64,
    /// `created_at` → `finished_at` when both parse, else POST → COMPLETED seen by the bench.
    total: Duration,
    hub_downtime_ms: u64,
    client: ClientView,
    /// The program's longest pause since the reset just before the job, ms: on the wall clock,
    /// and on CLOCK_MONOTONIC (which CRIU's time namespace makes skip the dump → restore span).
    program_pause_ms: Option<f64>,
    program_pause_mono_ms: Option<f64>,
    /// From the agents' logs.
    breakdown: String,
}

/// What the polling client saw.
#[derive(Default)]
struct ClientView {
    /// Last answer from the source → first answer from the target.
    downtime_ms: Option<f64>,
    /// Longest gap between two consecutive answers.
    max_gap_ms: Option<f64>,
    answers: usize,
    failures: usize,
    /// The target's first sequence number followed the source's last (memory came along).
    seq_continued: Option<bool>,
}

/// Runs the benchmark and prints the figures.
pub fn migrate(args: &MigrateArgs) -> anyhow::Result<()> {
    if args.sizes.is_empty() || args.rates.is_empty() || args.modes.is_empty() || args.runs == 0 {
        bail!("--sizes, --rates and --modes need at least one value, --runs at least 1");
    }
    crate::install::run()?;
    // BERTH_BIN_DIR: binaries built earlier (the cluster runs them without building).
    if let Some(dir) = std::env::var_os("BERTH_BIN_DIR") {
        println!("bench: using the binaries in {}", Path::new(&dir).display());
    } else {
        println!("bench: building release binaries");
        crate::build_release()?;
    }
    let prog = build_program()?;
    println!("bench: starting a private 3-node cluster");
    let cluster = Cluster::builder()
        .nodes(3)
        .profile(Profile::Release)
        .node_capacity("64", "64GB")
        .start()?;
    let image = push_image(&cluster, &prog)?;
    let api = cluster.api().clone();
    let net = api.create_network("migrate", "10.62.0.0/16")?;
    let network_id = net["network_id"].as_str().unwrap_or_default().to_owned();
    // A node's host does not reach another node's instances (the overlay is for instances): the
    // client runs in the network namespace of a small replica on its node, as a client container
    // would (only its network namespace: the program is the host's file).
    let anchor = api.create_container(&json!({
        "name": "anchor", "image": cluster.demo_image(), "cpu": "0.05", "memory": "16MB",
        "network_id": network_id, "replicas": 3,
    }))?;
    let c = api.wait_running(&anchor, 3, DEPLOY_TIMEOUT)?;
    let mut client_netns = BTreeMap::new();
    for (iid, node, _) in placements(&c) {
        let pid = cluster
            .init_pid(&node, &iid)
            .with_context(|| format!("no process in the cgroup of {iid}"))?;
        client_netns.insert(node, format!("/proc/{pid}/ns/net"));
    }
    if client_netns.len() != cluster.node_ids().len() {
        bail!("the anchor's replicas did not spread over the 3 nodes: {c}");
    }
    let bench = Bench {
        cluster: &cluster,
        api: &api,
        image,
        network_id,
        prog,
        poll_ms: args.poll_ms,
        client_kind: args.client.clone(),
        client_netns,
    };

    let mut rows = Vec::new();
    for &size in &args.sizes {
        for &rate in &args.rates {
            for _ in 0..args.runs {
                rows.extend(bench.case(size, rate, &args.modes)?);
            }
        }
    }
    print_table(&rows, &args.client, args.poll_ms);
    Ok(())
}

/// Compiles the test program into the target dir.
fn build_program() -> anyhow::Result<PathBuf> {
    let dir = berth_tests::paths::target_dir().join("bench-migrate");
    std::fs::create_dir_all(&dir)?;
    let src = dir.join("prog.c");
    std::fs::write(&src, include_str!("bench_migrate_prog.c"))?;
    let bin = dir.join("migrate-prog");
    crate::run(
        Command::new("gcc")
            .args(["-static", "-pthread", "-O2", "-Wall", "-o"])
            .arg(&bin)
            .arg(&src),
    )
    .context("compiling the test program (apt packages gcc, libc6-dev)")?;
    Ok(bin)
}

/// The demo image plus the program, pushed to the cluster's registry.
fn push_image(cluster: &Cluster, prog: &Path) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let layout = dir.path().join("layout");
    berth_tests::image::build_image(&layout, "1", Some("bench-migrate"))?;
    berth_tests::image::add_file(&layout, "1", prog, PROG_IN_IMAGE)?;
    let reference = format!("{}/bench/migrate:1", cluster.registry());
    berth_tests::image::push(&layout, "1", &reference)?;
    Ok(reference)
}

struct Bench<'a> {
    cluster: &'a Cluster,
    api: &'a Api,
    image: String,
    network_id: String,
    prog: PathBuf,
    poll_ms: u64,
    /// "keepalive" or "new".
    client_kind: String,
    /// Node → the network namespace its clients run in.
    client_netns: BTreeMap<String, String>,
}

/// A deployed test program.
struct Deployed {
    id: String,
    ip: String,
    source: String,
    target: String,
    client: String,
}

impl Bench<'_> {
    /// Every mode for one size and rate; a fresh container per migration.
    fn case(&self, size: u64, rate: u64, modes: &[String]) -> anyhow::Result<Vec<Row>> {
        let row = |mode: &str, outcome| Row {
            size,
            rate,
            mode: mode.to_owned(),
            outcome,
        };
        if let Some(why) = does_not_fit(size) {
            println!("bench: {size} MiB at {rate} MiB/s skipped: {why}");
            return Ok(modes
                .iter()
                .map(|m| row(m, Outcome::Skipped(why.clone())))
                .collect());
        }
        let mut rows = Vec::new();
        let mut deployed: Option<Deployed> = None;
        for mode in modes {
            let d = match deployed.take() {
                Some(d) => d,
                None => self.deploy(size, rate)?,
            };
            println!(
                "bench: {size} MiB, {rate} MiB/s, {mode}: {} → {}",
                d.source, d.target
            );
            match self.measure(&d, size, mode)? {
                Ok(m) => {
                    println!("  {}: {}", chosen(mode, &m), describe(&m, size));
                    rows.push(row(mode, Outcome::Ran(Box::new(m))));
                    self.remove(&d.id)?;
                }
                Err(why) => {
                    println!("  {mode} refused by the hub: {why}");
                    rows.push(row(mode, Outcome::Refused(why)));
                    deployed = Some(d);
                }
            }
        }
        if let Some(d) = deployed {
            self.remove(&d.id)?;
        }
        Ok(rows)
    }
}

impl Bench<'_> {
    /// Starts the program with `size` MiB rewriting `rate` MiB/s and waits until it answers from
    /// the node that will poll it; the target and the client host are the two other nodes.
    fn deploy(&self, size: u64, rate: u64) -> anyhow::Result<Deployed> {
        let id = self.api.create_container(&json!({
            "image": self.image, "cpu": "1",
            "memory": format!("{}MiB", size + LIMIT_SLACK_MIB),
            "network_id": self.network_id,
            "command": [PROG_IN_IMAGE, "serve", size.to_string(), rate.to_string()],
        }))?;
        let c = self.api.wait_running(&id, 1, DEPLOY_TIMEOUT)?;
        let Some((_, source, ip)) = placements(&c).into_iter().next() else {
            bail!("{id} runs without a placement: {c}");
        };
        let others: Vec<&String> = self
            .cluster
            .node_ids()
            .iter()
            .filter(|n| **n != source)
            .collect();
        let [target, client] = others[..] else {
            bail!("expected two nodes besides {source}: {others:?}");
        };
        // It listens only once all its memory is touched.
        berth_tests::wait_for("the program to answer", DEPLOY_TIMEOUT, || {
            Ok(match self.get(client, &ip, "/") {
                Ok(b) if b.starts_with("seq=") => Ok(()),
                other => Err(format!("{other:?}")),
            })
        })?;
        Ok(Deployed {
            id,
            ip,
            source,
            target: target.clone(),
            client: client.clone(),
        })
    }

    /// One migration in `mode`; `Ok(Err(message))` when the hub refuses the mode.
    fn measure(
        &self,
        d: &Deployed,
        size: u64,
        mode: &str,
    ) -> anyhow::Result<Result<Measured, String>> {
        // A moment of steady writing, then the program's pause counter starts afresh.
        std::thread::sleep(Duration::from_millis(500));
        self.get(&d.client, &d.ip, "/reset")?;
        let logs = [self.agent_log(&d.source), self.agent_log(&d.target)];
        let offsets = logs.each_ref().map(|p| file_len(p));
        let mut cmd = self.on_client(&d.client, &self.prog)?;
        cmd.args(["client", &self.client_kind]);
        let poller = Poller::start(cmd, &d.ip, self.poll_ms)?;
        std::thread::sleep(Duration::from_millis(300));
        let posted = Instant::now();
        let r = self.api.post(
            &format!("/v1/containers/{}/migrate", d.id),
            &json!({ "target_node": d.target, "mode": mode }),
        )?;
        if r.status == 400 {
            poller.stop()?;
            return Ok(Err(format!("HTTP 400: {}", r.error_message())));
        }
        let r = r.expect_status(202, "migrate")?;
        let Some(mid) = r.body["migration_id"].as_str() else {
            bail!("no migration_id in {}", r.text);
        };
        let job = loop {
            let j = self.api.get(&format!("/v1/migrations/{mid}"))?.body;
            if matches!(j["status"].as_str(), Some("COMPLETED" | "FAILED")) {
                break j;
            }
            if posted.elapsed() > JOB_TIMEOUT {
                bail!("migration {mid} still running after {JOB_TIMEOUT:?}: {j}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let seen_done = posted.elapsed();
        // The client goes on until the target has answered it (a kept-alive connection may wait
        // for TCP's retransmission backoff), then a little more.
        if job["status"] == "COMPLETED" {
            let waited = Instant::now();
            while analyse(&poller.lines()).downtime_ms.is_none()
                && waited.elapsed() < Duration::from_secs(30)
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        let lines = poller.stop()?;
        // Every attempt the client made, for a closer look at a gap.
        let trace = berth_tests::paths::harness_dir()
            .join("bench-migrate")
            .join(format!("client-{size}MiB-{mode}-{mid}.txt"));
        if let Some(dir) = trace.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if std::fs::write(&trace, lines.join("\n")).is_ok() {
            println!("  client trace: {}", trace.display());
        }
        let client = analyse(&lines);
        let after = self.get(&d.client, &d.ip, "/").ok();
        let pause = |key| {
            after
                .as_deref()
                .and_then(|b| field(b, key))
                .map(|us| us / 1000.0)
        };
        let c = self.api.container(&d.id)?.unwrap_or(Value::Null);
        if let Some(i) = instances(&c).first() {
            if i["restarts"].as_u64().unwrap_or(0) > 0 {
                println!("  note: the instance was restarted: {i}");
            }
        }
        let total = job_span(&job).unwrap_or(seen_done);
        Ok(Ok(Measured {
            status: job["status"].as_str().unwrap_or("?").to_owned(),
            chosen_mode: job["chosen_mode"].as_str().unwrap_or_default().to_owned(),
            write_rate_mib_s: job["write_rate_mib_s"].as_f64(),
            error: job["error"].as_str().unwrap_or_default().to_owned(),
            rounds: job["rounds"].as_u64().unwrap_or(0),
            bytes_sent: job["bytes_sent"].as_u64().unwrap_or(0),
            total,
            hub_downtime_ms: job["downtime_ms"].as_u64().unwrap_or(0),
            client,
            program_pause_ms: pause("wallgap_us"),
            program_pause_mono_ms: pause("maxgap_us"),
            breakdown: breakdown(
                &read_from(&logs[0], offsets[0]),
                &read_from(&logs[1], offsets[1]),
                size,
            ),
        }))
    }

    fn remove(&self, id: &str) -> anyhow::Result<()> {
        self.api.delete_container(id)?;
        self.api.wait_gone(id, Duration::from_secs(60))
    }

    /// `program` run in the client network namespace of `node`.
    fn on_client(&self, node: &str, program: &Path) -> anyhow::Result<Command> {
        let Some(netns) = self.client_netns.get(node) else {
            bail!("no client namespace on {node}");
        };
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={netns}")).arg("--").arg(program);
        Ok(cmd)
    }

    /// `GET http://IP/PATH` from a client on `node`.
    fn get(&self, node: &str, ip: &str, path: &str) -> anyhow::Result<String> {
        let url = format!("http://{ip}{path}");
        let out = self
            .on_client(node, Path::new("curl"))?
            .args(["-sS", "--max-time", "3", &url])
            .output()?;
        if !out.status.success() {
            bail!(
                "curl {url} from {node}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn agent_log(&self, node: &str) -> PathBuf {
        self.cluster
            .state()
            .run_dir
            .join("logs")
            .join(format!("agent-{node}.log"))
    }
}

/// Why a program of `size` MiB cannot be measured here, if it cannot: the source copy, the restored
/// copy and a dump exist at once, plus room for everything else.
fn does_not_fit(size: u64) -> Option<String> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let available_mib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())?
        / 1024;
    let need = 2 * (size + LIMIT_SLACK_MIB) + size + 1024;
    (need > available_mib).then(|| {
        format!(
            "needs about {need} MiB free (source and restored copies, a dump, 1 GiB spare), \
             {available_mib} MiB available"
        )
    })
}

/// The polling client, running in a client namespace.
struct Poller {
    child: Option<std::process::Child>,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Poller {
    /// `cmd`: `prog client KIND`, entered into the client's namespace.
    fn start(mut cmd: Command, ip: &str, poll_ms: u64) -> anyhow::Result<Poller> {
        // nsenter execs the program (no fork), so the child's pid is the client's.
        let mut child = cmd
            .args([ip, "80", &poll_ms.to_string(), "900"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the polling client")?;
        let out = child.stdout.take().context("client stdout")?;
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(l);
            }
        });
        Ok(Poller {
            child: Some(child),
            lines,
            reader: Some(reader),
        })
    }

    /// The lines so far.
    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops the client (SIGTERM: it prints what is still in flight) and returns its lines.
    fn stop(mut self) -> anyhow::Result<Vec<String>> {
        if let Some(mut child) = self.child.take() {
            crate::run(Command::new("kill").args(["-TERM", &child.id().to_string()]))?;
            child.wait()?;
        }
        if let Some(Err(_)) = self.reader.take().map(|r| r.join()) {
            bail!("the client's reader thread failed");
        }
        Ok(self.lines())
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One answer the client got: when it arrived (µs), the namespace that answered, its sequence number.
struct Answer {
    end_us: i64,
    net: String,
    seq: u64,
}

/// Reads the client's lines (`START END ok BODY` / `START END fail REASON`).
fn analyse(lines: &[String]) -> ClientView {
    let mut answers = Vec::new();
    let mut failures = 0;
    for l in lines {
        let mut parts = l.splitn(4, ' ');
        let (Some(_), Some(end), Some(kind), body) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (Ok(end_us), "ok", Some(body)) = (end.parse::<i64>(), kind, body) else {
            failures += 1;
            continue;
        };
        let net = body
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("net="))
            .unwrap_or_default()
            .to_owned();
        let seq = field(body, "seq").unwrap_or(0.0) as u64;
        answers.push(Answer { end_us, net, seq });
    }
    answers.sort_by_key(|a| a.end_us);
    let mut view = ClientView {
        answers: answers.len(),
        failures,
        max_gap_ms: answers
            .windows(2)
            .map(|w| (w[1].end_us - w[0].end_us) as f64 / 1000.0)
            .reduce(f64::max),
        ..ClientView::default()
    };
    let Some(source_net) = answers.first().map(|a| a.net.clone()) else {
        return view;
    };
    let last_source = answers.iter().rev().find(|a| a.net == source_net);
    let first_target = answers.iter().find(|a| a.net != source_net);
    if let (Some(s), Some(t)) = (last_source, first_target) {
        view.downtime_ms = Some((t.end_us - s.end_us) as f64 / 1000.0);
        view.seq_continued = Some(t.seq > s.seq);
    }
    view
}

/// The number after `key=` in a line of `key=value` words.
fn field(text: &str, key: &str) -> Option<f64> {
    text.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.trim_matches('"').parse().ok())
}

/// `created_at` → `finished_at` of a job.
fn job_span(job: &Value) -> Option<Duration> {
    let at = |k: &str| {
        time::OffsetDateTime::parse(
            job[k].as_str()?,
            &time::format_description::well_known::Rfc3339,
        )
        .ok()
    };
    let span = at("finished_at")? - at("created_at")?;
    Duration::try_from(span).ok()
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// What was appended to `path` after `offset`.
fn read_from(path: &Path, offset: u64) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let from = usize::try_from(offset).unwrap_or(0).min(text.len());
    String::from_utf8_lossy(&text[from..]).into_owned()
}

/// Where the time went, from the agents' log lines of this migration: each pre-copy round's dump
/// (with the pages it sent), the final dump, the restore on the target.
fn breakdown(source_log: &str, target_log: &str, size: u64) -> String {
    let mut parts = Vec::new();
    let rounds: Vec<String> = source_log
        .lines()
        .filter(|l| l.contains("pre-copy round sent"))
        .map(|l| {
            format!(
                "{:.0} ms/{} MiB",
                field(l, "dump_ms").unwrap_or(f64::NAN),
                pages_mib(field(l, "pages_sent"))
            )
        })
        .collect();
    if !rounds.is_empty() {
        parts.push(format!("pre-copy dumps (dump/sent) {}", rounds.join(", ")));
    }
    if let Some(l) = source_log
        .lines()
        .find(|l| l.contains("container frozen and dumped"))
    {
        parts.push(format!(
            "final dump {:.0} ms",
            field(l, "dump_ms").unwrap_or(f64::NAN)
        ));
    }
    if let Some(l) = source_log.lines().find(|l| l.contains("final round sent")) {
        parts.push(format!(
            "final delta {} MiB + {:.1} MiB files",
            pages_mib(field(l, "pages_sent")),
            field(l, "file_bytes").unwrap_or(0.0) / 1048576.0
        ));
    }
    if let Some(l) = target_log
        .lines()
        .find(|l| l.contains("migrated container restored and running"))
    {
        parts.push(format!(
            "target: prepare {:.0} ms, images {:.0} ms, restore {:.0} ms",
            field(l, "prepare_ms").unwrap_or(f64::NAN),
            field(l, "images_ms").unwrap_or(f64::NAN),
            field(l, "restore_ms").unwrap_or(f64::NAN)
        ));
    }
    if parts.is_empty() {
        format!("no round lines in the agents' logs ({size} MiB)")
    } else {
        parts.join("; ")
    }
}

fn pages_mib(pages: Option<f64>) -> String {
    match pages {
        Some(p) => format!("{:.1}", p * 4096.0 / 1048576.0),
        None => "?".into(),
    }
}

fn ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.0} ms"))
        .unwrap_or_else(|| "n/a".into())
}

/// The mode asked for, and what the source made of `auto` (with the write rate it measured).
fn chosen(asked: &str, m: &Measured) -> String {
    match (m.chosen_mode.as_str(), m.write_rate_mib_s) {
        ("", _) => asked.to_owned(),
        (c, Some(rate)) if c != asked => format!("{asked} → {c} ({rate:.1} MiB/s)"),
        (c, None) if c != asked => format!("{asked} → {c}"),
        _ => asked.to_owned(),
    }
}

/// One line per measured migration, printed as it finishes.
fn describe(m: &Measured, size: u64) -> String {
    let mut s = format!(
        "{} in {:.2} s: {} rounds, {:.1} MiB sent ({:.2}× resident), downtime hub {} ms / client {}, \
         client max gap {}, program pause {} (monotonic clock {}) ({} answers, {} failed attempts{}); {}",
        m.status,
        m.total.as_secs_f64(),
        m.rounds,
        m.bytes_sent as f64 / 1048576.0,
        m.bytes_sent as f64 / (size as f64 * 1048576.0),
        m.hub_downtime_ms,
        ms(m.client.downtime_ms),
        ms(m.client.max_gap_ms),
        ms(m.program_pause_ms),
        ms(m.program_pause_mono_ms),
        m.client.answers,
        m.client.failures,
        match m.client.seq_continued {
            Some(false) => "; SEQUENCE RESET on the target",
            _ => "",
        },
        m.breakdown
    );
    if !m.error.is_empty() {
        s.push_str(&format!("; error: {}", m.error));
    }
    s
}

fn print_table(rows: &[Row], client: &str, poll_ms: u64) {
    println!(
        "\nlive migration (release build, 3 nodes; hub, etcd and the agents share this machine's CPUs; \
         a client on the third node asks every {poll_ms} ms, connection: {client}):\n"
    );
    println!(
        "| resident | writes | mode | status | rounds | sent | sent / resident | total | downtime (hub) \
         | downtime (client) | client max gap | program pause (wall / monotonic) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let mode = match &r.outcome {
            Outcome::Ran(m) => chosen(&r.mode, m),
            _ => r.mode.clone(),
        };
        let head = format!("| {} MiB | {} MiB/s | {mode} |", r.size, r.rate);
        match &r.outcome {
            Outcome::Ran(m) => println!(
                "{head} {} | {} | {:.1} MiB | {:.2}× | {:.2} s | {} ms | {} | {} | {} / {} |",
                m.status,
                m.rounds,
                m.bytes_sent as f64 / 1048576.0,
                m.bytes_sent as f64 / (r.size as f64 * 1048576.0),
                m.total.as_secs_f64(),
                m.hub_downtime_ms,
                ms(m.client.downtime_ms),
                ms(m.client.max_gap_ms),
                ms(m.program_pause_ms),
                ms(m.program_pause_mono_ms),
            ),
            Outcome::Refused(why) => {
                println!("{head} not available | | | | | | | | | ({why})")
            }
            Outcome::Skipped(why) => println!("{head} skipped | | | | | | | | | ({why})"),
        }
    }
}
