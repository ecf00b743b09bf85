//! `tally bench`: drives a running Tally over real gRPC with N concurrent clients and reports
//! throughput, latency percentiles and errors by code.
//!
//! Workloads: `reserve-commit` (the generation-job pair: Reserve 5, Commit 4), `reserve-refund`
//! (Reserve 5, Refund: the job failed), `check-balance`. Accounts are uniform over
//! `--accounts` or all one `--hot` account. Closed loop by default (each client sends its next
//! operation when the previous one answered); `--rate R` paces the clients to R operations/s in
//! total (open loop; latency then counts from the scheduled send time, so a stall is not hidden).
//! Calls are not retried: every error is counted under its code.
#![allow(clippy::print_stdout, clippy::print_stderr)] // a benchmark prints its report
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)] // statistics

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde_json::json;
use tokio::time::Instant;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request};

use crate::config::Secret;
use crate::pb;
use crate::pb::admin_service_client::AdminServiceClient;
use crate::pb::credit_service_client::CreditServiceClient;

/// What each client does in a loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Reserve 5, then Commit 4 (one operation = the pair).
    ReserveCommit,
    /// Reserve 5, then Refund it whole (one operation = the pair).
    ReserveRefund,
    /// CheckBalance.
    CheckBalance,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Self::ReserveCommit => "reserve-commit",
            Self::ReserveRefund => "reserve-refund",
            Self::CheckBalance => "check-balance",
        }
    }
}

/// Options of `tally bench`.
#[allow(clippy::struct_excessive_bools)]
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Server to drive.
    #[arg(long, env = "TALLY_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// Bearer token (a caller with the generation and admin roles).
    #[arg(long, env = "TALLY_TOKEN", hide_env_values = true, value_parser = Secret::parse)]
    pub token: Option<Secret>,
    /// What each client does.
    #[arg(long, value_enum, default_value = "reserve-commit")]
    pub workload: Workload,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub clients: u32,
    /// HTTP/2 connections the clients share.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub connections: u32,
    /// How long to measure (after the warm-up) [default: 10s; with --count, until that count,
    /// at most an hour, or 10 s without a success].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Stop after this many measured operations (with --duration too: whichever comes first).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Unmeasured warm-up before the measurement.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Accounts the operations spread over uniformly.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub accounts: u32,
    /// All operations on one account (the row-lock-bound case).
    #[arg(long)]
    pub hot: bool,
    /// Target operations per second over all clients (0: as fast as they go).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Account id prefix (accounts are PREFIX-0 .. PREFIX-N).
    #[arg(long, default_value = "bench")]
    pub prefix: String,
    /// Skip granting the accounts their credits (they exist from an earlier run).
    #[arg(long)]
    pub no_setup: bool,
    /// Live balance streams (WatchBalance) open during the run, spread over the accounts (one
    /// stream per account first), read as fast as they come on connections of their own: the
    /// cost of watchers on the job path. 0..=100000.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub watchers: u32,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Latency samples in microseconds.
#[derive(Default)]
struct Samples(Vec<u32>);

impl Samples {
    fn push(&mut self, d: Duration) {
        self.0
            .push(u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
    }

    fn summary(&mut self) -> serde_json::Value {
        self.0.sort_unstable();
        let pick = |q: f64| -> f64 {
            if self.0.is_empty() {
                return 0.0;
            }
            let i = ((self.0.len() as f64 - 1.0) * q).round() as usize;
            f64::from(self.0[i.min(self.0.len() - 1)]) / 1000.0
        };
        json!({"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": pick(1.0)})
    }
}

#[derive(Default)]
struct Tally {
    op: Samples,
    first: Samples,
    second: Samples,
    errors: BTreeMap<String, u64>,
    ops: u64,
    /// Calls the server refused with a retry delay (OVERLOADED, RATE_LIMITED): waited out as
    /// a well-behaved client does, and counted apart from errors.
    refused: u64,
}

/// Why a call failed: refused with a retry delay, or an error.
enum Fail {
    Refused(Duration),
    Code(Code),
}

#[allow(clippy::needless_pass_by_value)] // the shape map_err hands it
fn fail(s: tonic::Status) -> Fail {
    use tonic_types::StatusExt as _;
    match (s.code(), s.get_details_retry_info()) {
        (Code::Unavailable | Code::ResourceExhausted, Some(info)) => {
            Fail::Refused(info.retry_delay.unwrap_or(Duration::from_millis(100)))
        }
        (code, _) => Fail::Code(code),
    }
}

fn code_name(c: Code) -> String {
    format!("{c:?}")
}

struct Shared {
    measuring: AtomicBool,
    stop: AtomicBool,
    done: AtomicU64,
    errors: AtomicU64,
    /// The slowest operation since the last progress line, in microseconds.
    worst_us: AtomicU64,
    limit: Option<u64>,
}

fn authed<T>(m: T, token: Option<&MetadataValue<tonic::metadata::Ascii>>) -> Request<T> {
    let mut r = Request::new(m);
    r.set_timeout(Duration::from_secs(10));
    if let Some(t) = token {
        r.metadata_mut().insert("authorization", t.clone());
    }
    r
}

async fn setup(
    channel: Channel,
    args: &BenchArgs,
    token: Option<&MetadataValue<tonic::metadata::Ascii>>,
) -> Result<(), String> {
    let n = if args.hot { 1 } else { args.accounts };
    let amount: i64 = if args.hot {
        1_000_000_000_000
    } else {
        1_000_000_000
    };
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let mut admin = AdminServiceClient::new(channel.clone());
        let next = Arc::clone(&next);
        let token = token.cloned();
        let prefix = args.prefix.clone();
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= u64::from(n) {
                    return Ok::<(), String>(());
                }
                let m = pb::GrantRequest {
                    account_id: format!("{prefix}-{i}"),
                    amount,
                    reason: "tally bench".into(),
                    idempotency_key: format!("bench-setup-{prefix}-{i}"),
                    ..Default::default()
                };
                admin
                    .grant(authed(m, token.as_ref()))
                    .await
                    .map_err(|s| format!("granting the bench accounts: {}", s.message()))?;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// Opens `--watchers` WatchBalance streams (round-robin over `accounts`, 200 per connection of
/// their own) and counts the balances they receive in `received` (the warm-up's too). The
/// streams end when the returned set is dropped.
///
/// # Errors
/// A message when the server cannot be reached or refuses a stream.
async fn watch_all(
    args: &BenchArgs,
    accounts: &[String],
    token: Option<&MetadataValue<tonic::metadata::Ascii>>,
    received: &Arc<AtomicU64>,
) -> Result<tokio::task::JoinSet<()>, String> {
    let mut set = tokio::task::JoinSet::new();
    let mut channel = None;
    for i in 0..args.watchers as usize {
        if i % 200 == 0 {
            channel = Some(
                Endpoint::from_shared(args.server.clone())
                    .map_err(|e| e.to_string())?
                    .tcp_nodelay(true)
                    .connect()
                    .await
                    .map_err(|e| format!("cannot reach {}: {e}", args.server))?,
            );
        }
        let Some(ch) = channel.clone() else { break };
        let req = pb::WatchBalanceRequest {
            account_id: accounts
                .get(i % accounts.len())
                .cloned()
                .unwrap_or_default(),
            after_version: None,
        };
        let mut stream = CreditServiceClient::new(ch)
            .watch_balance(authed(req, token))
            .await
            .map_err(|s| format!("opening watcher {i}: {}", s.message()))?
            .into_inner();
        let received = Arc::clone(received);
        set.spawn(async move {
            while let Ok(Some(_)) = stream.message().await {
                received.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    Ok(set)
}

#[allow(clippy::too_many_arguments, clippy::too_many_lines)] // one loop, one workload match
async fn client_loop(
    mut credit: CreditServiceClient<Channel>,
    workload: Workload,
    accounts: Vec<String>,
    seed: u64,
    interval: Option<Duration>,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
    shared: Arc<Shared>,
) -> Tally {
    let mut t = Tally::default();
    let mut x = seed | 1;
    // Open loop: stagger the clients over one interval so their sends do not arrive in bursts.
    let mut next_send = Instant::now()
        + interval.map_or(Duration::ZERO, |every| {
            every.mul_f64((seed % 1024) as f64 / 1024.0)
        });
    while !shared.stop.load(Ordering::Relaxed) {
        // xorshift: cheap uniform account choice
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let account = &accounts[(x % accounts.len() as u64) as usize];
        let start = match interval {
            Some(every) => {
                tokio::time::sleep_until(next_send).await;
                let scheduled = next_send;
                next_send += every;
                scheduled
            }
            None => Instant::now(),
        };
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        let measuring = shared.measuring.load(Ordering::Relaxed);
        let key = uuid::Uuid::now_v7().simple().to_string();
        let mut refused = 0u64;
        let result: Result<(), Fail> = async {
            match workload {
                Workload::CheckBalance => {
                    credit
                        .check_balance(authed(
                            pb::CheckBalanceRequest {
                                account_id: account.clone(),
                            },
                            token.as_ref(),
                        ))
                        .await
                        .map_err(fail)?;
                    if measuring {
                        t.first.push(start.elapsed());
                    }
                }
                Workload::ReserveCommit | Workload::ReserveRefund => {
                    let r = credit
                        .reserve(authed(
                            pb::ReserveRequest {
                                account_id: account.clone(),
                                cost: Some(pb::reserve_request::Cost::Amount(5)),
                                idempotency_key: format!("r{key}"),
                                ttl: Some(prost_types::Duration {
                                    seconds: 60,
                                    nanos: 0,
                                }),
                                ..Default::default()
                            },
                            token.as_ref(),
                        ))
                        .await
                        .map_err(fail)?
                        .into_inner();
                    let reserved = Instant::now();
                    if measuring {
                        t.first.push(reserved.duration_since(start));
                    }
                    let hold_id = r.hold.map(|h| h.hold_id).unwrap_or_default();
                    // Finishing the pair: a refusal is waited out and the call retried with
                    // the same key (abandoning it would leave the credits held).
                    loop {
                        let done = if workload == Workload::ReserveCommit {
                            credit
                                .commit(authed(
                                    pb::CommitRequest {
                                        hold_id: hold_id.clone(),
                                        amount: 4,
                                        idempotency_key: format!("c{key}"),
                                    },
                                    token.as_ref(),
                                ))
                                .await
                                .map(drop)
                        } else {
                            credit
                                .refund(authed(
                                    pb::RefundRequest {
                                        hold_id: hold_id.clone(),
                                        amount: None,
                                        reason: "bench".into(),
                                        idempotency_key: format!("f{key}"),
                                    },
                                    token.as_ref(),
                                ))
                                .await
                                .map(drop)
                        };
                        match done.map_err(fail) {
                            Ok(()) => break,
                            Err(Fail::Refused(wait)) => {
                                refused += 1;
                                tokio::time::sleep(wait).await;
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    if measuring {
                        t.second.push(reserved.elapsed());
                    }
                }
            }
            Ok(())
        }
        .await;
        if !measuring {
            match result {
                Err(Fail::Refused(wait)) => tokio::time::sleep(wait).await,
                Err(Fail::Code(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
                Ok(()) => {}
            }
            continue;
        }
        match result {
            Ok(()) => {
                let took = start.elapsed();
                t.op.push(took);
                let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
                shared.worst_us.fetch_max(us, Ordering::Relaxed);
                t.ops += 1;
                let done = shared.done.fetch_add(1, Ordering::Relaxed) + 1;
                if shared.limit.is_some_and(|l| done >= l) {
                    shared.stop.store(true, Ordering::Relaxed);
                }
            }
            Err(Fail::Refused(wait)) => {
                t.refused += 1;
                tokio::time::sleep(wait).await;
            }
            Err(Fail::Code(code)) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                *t.errors.entry(code_name(code)).or_default() += 1;
                // Do not spin on a dead server.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        if measuring {
            t.refused += refused;
        }
    }
    t
}

/// Runs the benchmark and prints the report.
///
/// # Errors
/// A message: the server is unreachable or the setup failed.
#[allow(clippy::too_many_lines)] // connect, set up, run, report: read top to bottom
pub async fn run(args: &BenchArgs) -> Result<(), String> {
    let token = args
        .token
        .as_ref()
        .map(|t| {
            format!("Bearer {}", t.expose())
                .parse::<MetadataValue<tonic::metadata::Ascii>>()
                .map_err(|_| "--token: not a valid header value".to_owned())
        })
        .transpose()?;
    let mut channels = Vec::new();
    for _ in 0..args.connections {
        channels.push(
            Endpoint::from_shared(args.server.clone())
                .map_err(|e| e.to_string())?
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .connect()
                .await
                .map_err(|e| format!("cannot reach {}: {e}", args.server))?,
        );
    }
    let n = if args.hot { 1 } else { args.accounts };
    let accounts: Vec<String> = (0..n).map(|i| format!("{}-{i}", args.prefix)).collect();
    if !args.no_setup {
        let t = Instant::now();
        setup(channels[0].clone(), args, token.as_ref()).await?;
        if !args.json {
            eprintln!(
                "setup: {n} account(s) funded in {:.1}s",
                t.elapsed().as_secs_f64()
            );
        }
    }
    let watched = Arc::new(AtomicU64::new(0));
    let watchers = watch_all(args, &accounts, token.as_ref(), &watched).await?;
    let shared = Arc::new(Shared {
        measuring: AtomicBool::new(args.warmup.is_zero()),
        stop: AtomicBool::new(false),
        done: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        worst_us: AtomicU64::new(0),
        limit: args.count,
    });
    let interval =
        (args.rate > 0.0).then(|| Duration::from_secs_f64(f64::from(args.clients) / args.rate));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.clients {
        let channel = channels[i as usize % channels.len()].clone();
        tasks.spawn(client_loop(
            CreditServiceClient::new(channel),
            args.workload,
            accounts.clone(),
            u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03,
            interval,
            token.clone(),
            Arc::clone(&shared),
        ));
    }
    tokio::time::sleep(args.warmup).await;
    shared.measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let mut last = (0u64, started);
    let duration = match (args.duration, args.count) {
        (Some(d), _) => d,
        (None, Some(_)) => Duration::from_hours(1),
        (None, None) => Duration::from_secs(10),
    };
    // A run to a count ends early when nothing has succeeded for this long (a server that
    // only refuses would otherwise be driven for the whole hour).
    let stalled_after = Duration::from_secs(10);
    let mut progress = (0u64, Instant::now());
    while started.elapsed() < duration && !shared.stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let done = shared.done.load(Ordering::Relaxed);
        if done != progress.0 {
            progress = (done, Instant::now());
        } else if args.duration.is_none() && progress.1.elapsed() >= stalled_after {
            eprintln!(
                "no operation succeeded for {}s: stopping before --count {}",
                stalled_after.as_secs(),
                args.count.unwrap_or_default()
            );
            break;
        }
        if last.1.elapsed() >= Duration::from_secs(1) && !args.json {
            let rate = (done - last.0) as f64 / last.1.elapsed().as_secs_f64();
            // The worst since the last line shows a stall the run's percentiles would hide.
            let worst_ms = shared.worst_us.swap(0, Ordering::Relaxed) as f64 / 1000.0;
            eprintln!(
                "  {:>4.0}s  {rate:>9.0} ops/s  {done:>9} ops  {} errors  max {worst_ms:.1} ms",
                started.elapsed().as_secs_f64(),
                shared.errors.load(Ordering::Relaxed)
            );
            last = (done, Instant::now());
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let watch_messages = watched.load(Ordering::Relaxed);
    drop(watchers);
    let mut total = Tally::default();
    while let Some(t) = tasks.join_next().await {
        let t = t.map_err(|e| e.to_string())?;
        total.op.0.extend(t.op.0);
        total.first.0.extend(t.first.0);
        total.second.0.extend(t.second.0);
        total.ops += t.ops;
        total.refused += t.refused;
        for (k, v) in t.errors {
            *total.errors.entry(k).or_default() += v;
        }
    }
    let (first, second) = match args.workload {
        Workload::ReserveCommit => ("Reserve", Some("Commit")),
        Workload::ReserveRefund => ("Reserve", Some("Refund")),
        Workload::CheckBalance => ("CheckBalance", None),
    };
    let mut rpc = serde_json::Map::new();
    rpc.insert(first.into(), total.first.summary());
    if let Some(s) = second {
        rpc.insert(s.into(), total.second.summary());
    }
    let report = json!({
        "workload": args.workload.name(),
        "clients": args.clients,
        "connections": args.connections,
        "accounts": n,
        "hot": args.hot,
        "target_rate": args.rate,
        "duration_s": elapsed,
        "ops": total.ops,
        "ops_per_s": total.ops as f64 / elapsed.max(1e-9),
        "unit": if second.is_some() { "pairs" } else { "calls" },
        "latency_ms": total.op.summary(),
        "rpc_latency_ms": rpc,
        "errors": total.errors,
        "refused": total.refused,
        "refused_per_s": total.refused as f64 / elapsed.max(1e-9),
        "watchers": args.watchers,
        "watch_messages_per_s": watch_messages as f64 / elapsed.max(1e-9),
    });
    if args.json {
        println!("{report}");
    } else {
        let l = &report["latency_ms"];
        println!(
            "{} x{} on {} account(s): {:.0} {}/s over {:.1}s ({} ops)",
            args.workload.name(),
            args.clients,
            n,
            report["ops_per_s"].as_f64().unwrap_or(0.0),
            report["unit"].as_str().unwrap_or("ops"),
            elapsed,
            total.ops
        );
        println!(
            "latency ms  p50 {}  p90 {}  p99 {}  max {}",
            l["p50"], l["p90"], l["p99"], l["max"]
        );
        for (name, s) in &rpc {
            println!(
                "  {name:<12} p50 {}  p90 {}  p99 {}  max {}",
                s["p50"], s["p90"], s["p99"], s["max"]
            );
        }
        println!(
            "refused     {} ({:.0}/s; waited out, retried as their RetryInfo asks)",
            total.refused,
            total.refused as f64 / elapsed.max(1e-9)
        );
        if args.watchers > 0 {
            println!(
                "watchers    {} streams, {:.0} balances/s received",
                args.watchers,
                report["watch_messages_per_s"].as_f64().unwrap_or(0.0)
            );
        }
        if total.errors.is_empty() {
            println!("errors      none");
        } else {
            println!("errors      {:?}", total.errors);
        }
    }
    Ok(())
}
