//! One typed configuration for `tally serve` (and `tally stripe sync`), in layers: built-in
//! defaults, then a TOML file (`--config FILE` / `TALLY_CONFIG`), then `TALLY_*` environment
//! variables, then command-line flags. Secrets also come from `*_FILE` options (Kubernetes
//! Secrets mounted as files), which win over the plain value.
//!
//! The file's keys are the long option names with `_` (`db_max_connections = 32`,
//! `request_timeout = "30s"`); `tally config print-default` prints every one, commented, with
//! its default and its environment variable. Every value goes through the same parser and
//! validation as the flag, so an invalid file fails at start naming the key and the reason.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command};

/// A secret option value: `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value (a clap value parser).
    ///
    /// # Errors
    /// Never; the signature is clap's.
    pub fn parse(s: &str) -> Result<Self, std::convert::Infallible> {
        Ok(Self(s.to_owned()))
    }

    /// The secret itself, for the one place that uses it.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Reads a secret from `file` (trimmed) when given, else takes `value`.
///
/// # Errors
/// The option name and the I/O error (never the content).
pub fn secret_from(
    option: &str,
    file: Option<&Path>,
    value: Option<&Secret>,
) -> Result<Option<String>, String> {
    let raw = match file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("{option}-file {}: {e}", path.display()))?,
        ),
        None => value.map(|v| v.expose().to_owned()),
    };
    Ok(raw.map(|r| r.trim().to_owned()).filter(|r| !r.is_empty()))
}

/// Largest config file: 1 MiB.
pub const CONFIG_FILE_MAX_BYTES: u64 = 1024 * 1024;

/// Options that are not config-file keys: the file itself, and help.
const NOT_IN_FILE: &[&str] = &["config", "help", "version"];

/// The option set (`serve`'s) and its matches, wherever in the command tree it is.
fn serve_matches<'a>(cmd: &'a Command, m: &'a ArgMatches) -> Option<(&'a Command, &'a ArgMatches)> {
    let (name, sub) = m.subcommand()?;
    let sub_cmd = cmd.find_subcommand(name)?;
    if sub_cmd.get_arguments().any(|a| a.get_id() == "config") {
        return Some((sub_cmd, sub));
    }
    serve_matches(sub_cmd, sub)
}

fn toml_to_arg(key: &str, v: &toml::Value) -> Result<String, String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        toml::Value::Datetime(d) => Ok(d.to_string()),
        toml::Value::Array(_) | toml::Value::Table(_) => {
            Err(format!("`{key}`: expected a string, number or boolean"))
        }
    }
}

/// The command line with the config file's values added for every option that neither a
/// flag nor an environment variable set. `argv` unchanged when no file is named.
///
/// # Errors
/// A message naming the file and the key: unreadable, not TOML, unknown key, wrong type.
pub fn layer_file(
    cmd: &Command,
    matches: &ArgMatches,
    argv: &[OsString],
) -> Result<Vec<OsString>, String> {
    let mut out = argv.to_vec();
    let Some((serve, m)) = serve_matches(cmd, matches) else {
        return Ok(out);
    };
    let Some(path) = m.get_one::<std::path::PathBuf>("config") else {
        return Ok(out);
    };
    let table = read(path)?;
    let shown = path.display();
    for (key, value) in &table {
        let arg = serve
            .get_arguments()
            .find(|a| a.get_id() == key.as_str() && !NOT_IN_FILE.contains(&key.as_str()))
            .ok_or_else(|| {
                format!(
                    "config file {shown}: unknown key `{key}` (`tally config print-default` lists them)"
                )
            })?;
        if matches!(
            m.value_source(key),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue; // a flag or TALLY_* variable wins over the file
        }
        let long = arg.get_long().unwrap_or(key.as_str());
        let text = toml_to_arg(key, value).map_err(|e| format!("config file {shown}: {e}"))?;
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            match text.as_str() {
                "true" => out.push(format!("--{long}").into()),
                "false" => {}
                _ => {
                    return Err(format!(
                        "config file {shown}: `{key}`: expected true or false"
                    ));
                }
            }
        } else {
            out.push(format!("--{long}={text}").into());
        }
    }
    Ok(out)
}

fn read(path: &Path) -> Result<toml::Table, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("config file {shown}: {e}"))?;
    if meta.len() > CONFIG_FILE_MAX_BYTES {
        return Err(format!("config file {shown}: larger than 1 MiB"));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("config file {shown}: {e}"))?;
    toml::from_str(&text).map_err(|e| format!("config file {shown}: {}", e.message()))
}

/// A commented example config: every option of `serve` with its help, its environment
/// variable and its default. Uncommented, it configures exactly the defaults.
#[must_use]
pub fn print_default(cmd: &Command) -> String {
    let mut out = String::from(
        "# tally serve configuration (TOML). Precedence: defaults < this file < TALLY_* environment < flags.\n\
         # Point to it with --config FILE or TALLY_CONFIG. Secrets belong in *_file options (mounted Secrets),\n\
         # not here: database_url_file, callers_file, stripe_api_key_file, stripe_webhook_secret_file.\n",
    );
    let Some(serve) = cmd.find_subcommand("serve") else {
        return out;
    };
    for arg in serve.get_arguments() {
        let id = arg.get_id().as_str();
        if NOT_IN_FILE.contains(&id) || arg.is_hide_set() {
            continue;
        }
        let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
        let env = arg
            .get_env()
            .map(|e| format!(" (env {})", e.to_string_lossy()))
            .unwrap_or_default();
        let _ = writeln!(out, "\n# {help}{env}");
        let default = arg
            .get_default_values()
            .first()
            .map(|v| v.to_string_lossy().into_owned());
        let value = match (arg.get_action(), default) {
            (ArgAction::SetTrue, _) => "false".to_owned(),
            (_, Some(d)) if d.parse::<i64>().is_ok() || d == "true" || d == "false" => d,
            (_, Some(d)) => format!("\"{}\"", d.replace('\\', "\\\\").replace('"', "\\\"")),
            (_, None) => {
                let _ = writeln!(out, "# {id} = (no default)");
                continue;
            }
        };
        let _ = writeln!(out, "# {id} = {value}");
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, FromArgMatches as _};

    use super::*;
    use crate::cli::{Cli, Command as Sub};

    fn parse(argv: &[&str], file: Option<&str>) -> Result<Cli, String> {
        let dir = tempfile::tempdir().unwrap();
        let mut argv: Vec<OsString> = argv.iter().map(Into::into).collect();
        if let Some(text) = file {
            let path = dir.path().join("tally.toml");
            std::fs::write(&path, text).unwrap();
            argv.push("--config".into());
            argv.push(path.into_os_string());
        }
        let cmd = Cli::command();
        let m = cmd
            .clone()
            .try_get_matches_from(&argv)
            .map_err(|e| e.to_string())?;
        let layered = layer_file(&cmd, &m, &argv)?;
        let m = cmd
            .try_get_matches_from(layered)
            .map_err(|e| e.to_string())?;
        Cli::from_arg_matches(&m).map_err(|e| e.to_string())
    }

    fn serve(cli: Cli) -> crate::cli::ServeArgs {
        match cli.command {
            Sub::Serve(a) => *a,
            _ => panic!("not serve"),
        }
    }

    #[test]
    fn the_file_sets_what_flags_do_not_and_flags_win() {
        let a = serve(
            parse(
                &["tally", "serve", "--db-max-connections", "7"],
                Some("db_max_connections = 9\nrequest_timeout = \"3s\"\nstripe_livemode = true\nreflection = false"),
            )
            .unwrap(),
        );
        assert_eq!(a.db_max_connections, 7, "the flag wins");
        assert_eq!(a.request_timeout, std::time::Duration::from_secs(3));
        assert!(a.stripe_livemode);
        assert!(!a.reflection);
    }

    /// Issue 23, item 9: without callers, gRPC may bind beyond loopback only under mutual TLS
    /// (as the README says); the HTTP sidecar never may.
    #[test]
    fn mutual_tls_is_the_one_way_beyond_loopback_without_callers() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, "PEM").unwrap();
            p.display().to_string()
        };
        let (cert, key, ca) = (file("c.pem"), file("k.pem"), file("ca.pem"));
        let db = format!("sqlite://{}", dir.path().join("t.db").display());
        let settings = |extra: &[&str]| {
            let mut argv = vec!["tally", "serve", "--database-url", &db];
            argv.extend_from_slice(extra);
            serve(parse(&argv, None).unwrap()).settings()
        };
        let wide = ["--listen", "0.0.0.0:50051"];
        let e = settings(&wide).unwrap_err();
        assert!(
            e.contains("--listen") && e.contains("--tls-client-ca"),
            "{e}"
        );
        let tls = ["--tls-cert", &cert, "--tls-key", &key];
        let e = settings(&[&wide[..], &tls[..]].concat()).unwrap_err();
        assert!(
            e.contains("--listen"),
            "TLS without client certificates: {e}"
        );
        let mtls = [&wide[..], &tls[..], &["--tls-client-ca", &ca]].concat();
        assert!(settings(&mtls).is_ok());
        let http = [&mtls[..], &["--http-listen", "0.0.0.0:8080"]].concat();
        let e = settings(&http).unwrap_err();
        assert!(e.contains("--http-listen"), "{e}");
    }

    #[test]
    fn bad_files_name_the_key() {
        let e = parse(&["tally", "serve"], Some("db_max_conections = 9")).unwrap_err();
        assert!(e.contains("db_max_conections"), "{e}");
        let e = parse(&["tally", "serve"], Some("db_max_connections = \"many\"")).unwrap_err();
        assert!(e.contains("db-max-connections"), "{e}");
        let e = parse(&["tally", "serve"], Some("hold_ttl_max = [1]")).unwrap_err();
        assert!(e.contains("hold_ttl_max"), "{e}");
        let e = parse(&["tally", "serve"], Some("not toml")).unwrap_err();
        assert!(e.contains("config file"), "{e}");
    }

    #[test]
    fn the_printed_default_uncommented_is_a_valid_config_of_the_defaults() {
        let text = print_default(&Cli::command());
        // The value lines: `# key = value` with a one-word key.
        let uncommented: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| !l.ends_with("(no default)"))
            .filter(|l| l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')))
            .fold(String::new(), |mut acc, l| {
                acc.push_str(l);
                acc.push('\n');
                acc
            });
        assert!(
            uncommented.contains("db_max_connections = 16"),
            "{uncommented}"
        );
        assert!(uncommented.lines().count() > 20, "{uncommented}");
        let mut from_file = serve(parse(&["tally", "serve"], Some(&uncommented)).unwrap());
        assert!(from_file.config.is_some());
        from_file.config = None;
        let defaults = serve(parse(&["tally", "serve"], None).unwrap());
        assert_eq!(format!("{from_file:?}"), format!("{defaults:?}"));
        from_file.settings().unwrap();
    }
}
