//! Talking to a running server: the client options, the connection (over `tally::client`),
//! errors as the CLI prints them, and output helpers.
#![allow(clippy::print_stdout)] // printing results is this module's job

use std::time::Duration;

use clap::Args;
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_types::StatusExt;

use crate::config::Secret;
use crate::pb;

/// Options shared by client commands.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Address of a running tally server.
    #[arg(long, env = "TALLY_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Deadline of the call.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// PEM CA bundle to verify an https:// server with.
    #[arg(long, env = "TALLY_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// PEM client certificate, for a server that requires mutual TLS (with --tls-client-key).
    #[arg(long, env = "TALLY_TLS_CLIENT_CERT", requires = "tls_client_key")]
    pub tls_client_cert: Option<std::path::PathBuf>,
    /// PEM key of the client certificate.
    #[arg(long, env = "TALLY_TLS_CLIENT_KEY", requires = "tls_client_cert")]
    pub tls_client_key: Option<std::path::PathBuf>,
    /// Bearer token of this caller (when the server has a callers file).
    #[arg(long, env = "TALLY_TOKEN", hide_env_values = true, value_parser = Secret::parse)]
    pub token: Option<Secret>,
}

/// The idempotency key option of mutating commands.
#[derive(Debug, Args)]
pub struct KeyArgs {
    /// Idempotency key (generated if omitted; reuse it to retry safely).
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

impl KeyArgs {
    pub(super) fn key(&self) -> String {
        self.idempotency_key
            .clone()
            .unwrap_or_else(|| format!("cli-{}", uuid::Uuid::now_v7()))
    }
}

pub(super) fn parse_time(s: &str) -> Result<prost_types::Timestamp, String> {
    let t = chrono::DateTime::parse_from_rfc3339(s)
        .map_err(|e| format!("{s:?}: {e} (use RFC 3339, e.g. 2026-11-01T00:00:00Z)"))?;
    Ok(prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    })
}

pub(super) fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// A client command's failure, printed as one line (or JSON) by `main`.
#[derive(Debug)]
pub struct ClientError {
    /// The stable reason (`INSUFFICIENT_CREDITS`, `UNAVAILABLE`, ...).
    pub reason: String,
    /// What happened.
    pub message: String,
    /// Extra lines (field violations, retry hints).
    pub details: Vec<String>,
    /// The gRPC code's name (`FAILED_PRECONDITION`), when the server answered.
    pub code: Option<&'static str>,
    /// The ErrorInfo metadata (`available`, `requested`, ...).
    pub metadata: std::collections::BTreeMap<String, String>,
}

impl ClientError {
    pub(super) fn new(reason: &str, message: impl Into<String>, details: Vec<String>) -> Self {
        Self {
            reason: reason.to_owned(),
            message: message.into(),
            details,
            code: None,
            metadata: std::collections::BTreeMap::new(),
        }
    }

    /// The error as `--json` prints it on stderr:
    /// `{"code", "reason", "message", "metadata", "details"}`.
    #[must_use]
    pub fn to_json(&self) -> Value {
        json!({
            "code": self.code,
            "reason": self.reason,
            "message": self.message,
            "metadata": self.metadata,
            "details": self.details,
        })
    }
}

/// Writes a line to stdout; a closed pipe (`tally entries u1 | head -1`) ends the command
/// quietly with status 0, as `ls` does.
pub fn out(text: &str) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)?;
        for d in &self.details {
            write!(f, "\n  {d}")?;
        }
        Ok(())
    }
}

pub(super) fn status_error(s: &Status, key: Option<&str>) -> ClientError {
    let details = s.get_error_details();
    let reason = details.error_info().map_or_else(
        || crate::grpc::gate::code_name(s.code()).to_owned(),
        |i| i.reason.clone(),
    );
    // The message already lists the violations of an INVALID_ARGUMENT; other codes get them here.
    let mut lines: Vec<String> = details
        .bad_request()
        .filter(|_| s.code() != Code::InvalidArgument)
        .map(|b| {
            b.field_violations
                .iter()
                .map(|v| format!("{}: {}", v.field, v.description))
                .collect()
        })
        .unwrap_or_default();
    if let (Some(key), Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Unknown) =
        (key, s.code())
    {
        lines.push(format!(
            "the outcome may be unknown: retry with --idempotency-key {key}"
        ));
    }
    // A gRPC client pointed at an HTTP port gets an HTTP answer: say so.
    if s.message().contains("grpc-status header missing") {
        return ClientError::new(
            "NOT_GRPC",
            "that address speaks HTTP, not Tally's gRPC (did you mean --server http://HOST:50051?)",
            vec![s.message().to_owned()],
        );
    }
    ClientError {
        reason,
        message: s.message().to_owned(),
        details: lines,
        code: Some(crate::grpc::gate::code_name(s.code())),
        metadata: details
            .error_info()
            .map(|i| i.metadata.clone().into_iter().collect())
            .unwrap_or_default(),
    }
}

async fn channel(c: &ClientArgs) -> Result<Channel, ClientError> {
    // `host:port` alone means plaintext HTTP/2; any scheme but http and https is named.
    let server = match c.server.split_once("://") {
        None => format!("http://{}", c.server),
        Some(("http" | "https", _)) => c.server.clone(),
        Some((scheme, _)) => {
            return Err(ClientError::new(
                "INVALID_ARGUMENT",
                format!("--server {}: {scheme}:// is not Tally's protocol", c.server),
                vec!["use http://HOST:PORT (plaintext) or https://HOST:PORT (TLS)".into()],
            ));
        }
    };
    let tls = server.starts_with("https://");
    let unreachable = |e: &dyn std::error::Error| {
        let hint = if tls {
            "is it running, and does it speak TLS? A plaintext server needs http://; check --tls-ca"
        } else {
            "start one with `tally serve`, or pass --server; a TLS server needs https://"
        };
        ClientError::new(
            "UNAVAILABLE",
            format!("cannot reach tally at {server}: {}", source_chain(e)),
            vec![hint.into()],
        )
    };
    let mut endpoint = Endpoint::from_shared(server.clone())
        .map_err(|e| unreachable(&e))?
        .connect_timeout(Duration::from_secs(5));
    if tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| {
                ClientError::new("INVALID_ARGUMENT", format!("{}: {e}", p.display()), vec![])
            })
        };
        let mut tls = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = &c.tls_ca {
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&c.tls_client_cert, &c.tls_client_key) {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                read(cert)?,
                read(key)?,
            ));
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| unreachable(&e))?;
    }
    endpoint.connect().await.map_err(|e| unreachable(&e))
}

/// An error with its causes (tonic's transport error says only "transport error").
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Most attempts of one CLI call that the server asked to retry: 8.
pub const CLI_ATTEMPTS: u32 = 8;

/// A connection to a running server, through `tally::client` (its token, deadline and
/// retries: the same request, so the same idempotency key, on every attempt).
pub(super) struct Remote {
    client: crate::client::Client,
}

impl Remote {
    /// Connects as `--server`, `--tls-*` and `--token` say; each call may take `--timeout` in
    /// all, in at most [`CLI_ATTEMPTS`] attempts.
    pub(super) async fn connect(c: &ClientArgs) -> Result<Self, ClientError> {
        let config = crate::client::Config {
            deadline: c.timeout,
            attempts: CLI_ATTEMPTS,
            ..crate::client::Config::default()
        };
        let token = c.token.as_ref().map(Secret::expose);
        let client =
            crate::client::Client::new(channel(c).await?, token, config).map_err(|_| {
                ClientError::new(
                    "INVALID_ARGUMENT",
                    "--token: not a valid header value",
                    Vec::new(),
                )
            })?;
        Ok(Self { client })
    }

    /// One RPC; a failure as the CLI reports it (with `key` to retry an unknown outcome with).
    pub(super) async fn call<M, R, F, Fut>(
        &self,
        key: Option<&str>,
        message: M,
        call: F,
    ) -> Result<R, ClientError>
    where
        M: Clone,
        F: Fn(Channel, tonic::Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, Status>>,
    {
        self.client
            .call(message, call)
            .await
            .map_err(|s| status_error(&s, key))
    }
}

/// An API enum value's name as the CLI prints and takes it: lower case, without its type's
/// prefix (`GRANT_SOURCE_SIGNUP_BONUS` → `signup_bonus`).
pub(super) fn enum_word(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_lowercase()
}

/// A grant source's word.
pub(super) fn source_word(v: i32) -> String {
    pb::GrantSource::try_from(v).map_or_else(
        |_| v.to_string(),
        |s| enum_word(s.as_str_name(), "GRANT_SOURCE_"),
    )
}

/// An entry kind's word.
pub(super) fn kind_word(v: i32) -> String {
    pb::EntryKind::try_from(v).map_or_else(
        |_| v.to_string(),
        |k| enum_word(k.as_str_name(), "ENTRY_KIND_"),
    )
}

/// Parses a word of an API enum (`purchase`, `transfer_out`) given its prefix; `field` names
/// the option in the error, which lists the words known.
pub(super) fn parse_word<E: Copy>(
    word: &str,
    prefix: &str,
    field: &str,
    from_name: fn(&str) -> Option<E>,
    all: &[&str],
) -> Result<E, ClientError> {
    from_name(&format!("{prefix}{}", word.to_uppercase())).ok_or_else(|| {
        let known: Vec<String> = all
            .iter()
            .filter(|n| !n.ends_with("_UNSPECIFIED"))
            .map(|n| enum_word(n, prefix))
            .collect();
        ClientError::new(
            "INVALID_ARGUMENT",
            format!("{field}: unknown {word:?}; known: {}", known.join(", ")),
            Vec::new(),
        )
    })
}

pub(super) fn time(t: Option<&prost_types::Timestamp>) -> Value {
    t.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .map_or(Value::Null, |t| {
            Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        })
}

pub(super) fn state_name(s: i32) -> String {
    pb::HoldState::try_from(s).map_or_else(
        |_| "unknown".into(),
        |s| {
            s.as_str_name()
                .trim_start_matches("HOLD_STATE_")
                .to_lowercase()
        },
    )
}

pub(super) fn hold_json(h: &pb::Hold) -> Value {
    json!({
        "hold_id": h.hold_id, "account_id": h.account_id, "amount": h.amount, "state": state_name(h.state),
        "committed_amount": h.committed_amount, "refunded_amount": h.refunded_amount,
        "created_at": time(h.created_at.as_ref()), "expires_at": time(h.expires_at.as_ref()),
        "resolved_at": time(h.resolved_at.as_ref()), "metadata": h.metadata,
    })
}

pub(super) fn hold_line(h: &pb::Hold) -> String {
    let when = match pb::HoldState::try_from(h.state) {
        Ok(pb::HoldState::Open) => format!(
            "expires {}",
            time(h.expires_at.as_ref()).as_str().unwrap_or("?")
        ),
        Ok(pb::HoldState::Committed) => format!(
            "committed {} refunded {}",
            h.committed_amount, h.refunded_amount
        ),
        _ => format!(
            "at {}",
            time(h.resolved_at.as_ref()).as_str().unwrap_or("?")
        ),
    };
    format!(
        "{}  {:<9}  {:>8}  {}  {when}",
        h.hold_id,
        state_name(h.state),
        h.amount,
        h.account_id
    )
}

/// Prints `value` as JSON or `text` as text.
pub(super) fn print(json: bool, value: &Value, text: &str) {
    if json {
        out(&format!("{value:#}"));
    } else {
        out(text);
    }
}
