//! Typed configuration for the broker (`broker.toml`) and the agent (`agent.toml`).
//!
//! Each binary has one config type. It is assembled in layers, each overriding the one before:
//!
//! 1. built-in defaults;
//! 2. the TOML file given with `--config` (unknown fields are refused);
//! 3. environment variables `FRAMECAST_<SECTION>__<FIELD>` (a double underscore separates
//!    levels, so `FRAMECAST_HTTP__LISTEN` sets `http.listen`);
//! 4. command-line flags, including `--set key.path=value`.
//!
//! Then one validation pass checks every rule and reports all failures at once, each naming
//! the field and the rule: `tiers.4k.framebuffer_mb = 8100: must be a multiple of 64`.

pub mod agent;
pub mod broker;
pub mod cli;
pub mod inventory;
pub mod planner;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use agent::AgentConfig;
pub use broker::BrokerConfig;
pub use cli::ConfigArgs;
pub use validate::FieldError;

/// The prefix of environment variables that override configuration.
pub const ENV_PREFIX: &str = "FRAMECAST_";

/// Environment variables with [`ENV_PREFIX`] that are not configuration fields.
const RESERVED_ENV: [&str; 2] = ["config", "log"];

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file named does not exist or is not a file.
    #[error("config file {}: not found", path.display())]
    NotFound {
        /// The path given.
        path: PathBuf,
    },
    /// A layer held something that does not fit the schema: an unknown field, a value of the
    /// wrong type, a malformed file.
    #[error("{}", join_lines(.0))]
    Parse(Vec<ParseError>),
    /// Values of the right type that break a rule.
    #[error("{}", join_lines(.0))]
    Invalid(Vec<FieldError>),
}

impl ConfigError {
    /// One line per problem, for printing.
    pub fn lines(&self) -> Vec<String> {
        match self {
            Self::NotFound { .. } => vec![self.to_string()],
            Self::Parse(errors) => errors.iter().map(ToString::to_string).collect(),
            Self::Invalid(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }
}

fn join_lines<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A value that does not fit the schema, with the field and the layer it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// The dotted path of the field, empty for the whole document.
    pub field: String,
    /// What is wrong.
    pub message: String,
    /// Which layer supplied it: the file, an environment variable, a flag.
    pub source: Option<String>,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.field.is_empty(), &self.source) {
            (true, Some(src)) => write!(f, "{}: {}", src, self.message),
            (true, None) => f.write_str(&self.message),
            (false, Some(src)) => write!(f, "{}: {} (from {})", self.field, self.message, src),
            (false, None) => write!(f, "{}: {}", self.field, self.message),
        }
    }
}

/// `[...tls]`: PEM files for mutual TLS between agents and brokers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The CA that signs both sides' certificates.
    pub ca_cert: PathBuf,
    /// This side's certificate chain.
    pub cert: PathBuf,
    /// This side's private key.
    pub key: PathBuf,
}

impl TlsConfig {
    fn check(&self, c: &mut validate::Checker<'_>) {
        for (field, path) in [
            ("ca_cert", &self.ca_cert),
            ("cert", &self.cert),
            ("key", &self.key),
        ] {
            c.check(path.is_file(), field, path, "file not found");
        }
    }
}

/// A configuration type: how it is validated.
pub trait Validate {
    /// Appends every rule this value breaks to `errors`.
    fn validate(&self, errors: &mut Vec<FieldError>);
}

/// Where one load takes its layers from.
#[derive(Debug, Default, Clone)]
pub struct Sources<'a> {
    /// The TOML file, if one was given.
    pub file: Option<&'a Path>,
    /// `(name, value)` pairs of the environment; only those with [`ENV_PREFIX`] are used.
    /// `None` reads the process environment.
    pub env: Option<Vec<(String, String)>>,
    /// Command-line overrides as `(dotted.key, value)`; values are parsed like TOML values.
    pub flags: Vec<(String, String)>,
}

/// Loads `T` from its defaults and `sources`, then validates it.
///
/// ```
/// use framecast_shared::config::{BrokerConfig, Sources, load};
///
/// let sources = Sources {
///     env: Some(vec![("FRAMECAST_TIERS__4K__FRAMEBUFFER_MB".into(), "8100".into())]),
///     ..Sources::default()
/// };
/// let err = load::<BrokerConfig>(&sources).unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "tiers.4k.framebuffer_mb = 8100: must be a multiple of 64 \
///      (from environment variable FRAMECAST_TIERS__4K__FRAMEBUFFER_MB)"
/// );
/// ```
pub fn load<T>(sources: &Sources<'_>) -> Result<T, ConfigError>
where
    T: Default + Serialize + DeserializeOwned + Validate,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = sources.file {
        if !path.is_file() {
            return Err(ConfigError::NotFound {
                path: path.to_owned(),
            });
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    figment = match &sources.env {
        // Non-UTF-8 variables cannot be config values; `vars_os` skips them instead of
        // panicking like `vars` would.
        None => figment.merge(Layer::from_env(
            &std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect::<Vec<_>>(),
        )),
        Some(vars) => figment.merge(Layer::from_env(vars)),
    };
    figment = figment.merge(Layer::from_flags(&sources.flags));

    let value: T = figment
        .extract()
        .map_err(|e| ConfigError::Parse(parse_errors(e)))?;
    let mut errors = Vec::new();
    value.validate(&mut errors);
    if errors.is_empty() {
        return Ok(value);
    }
    for error in &mut errors {
        error.source = figment
            .find_metadata(&error.field)
            .map(|m| source_name(m, &error.field));
    }
    Err(ConfigError::Invalid(errors))
}

/// Renders `value` as TOML, as `check-config --print` shows the effective configuration.
pub fn to_toml<T: Serialize>(value: &T) -> Result<String, toml::ser::Error> {
    toml::to_string_pretty(value)
}

fn parse_errors(error: figment::Error) -> Vec<ParseError> {
    error
        .into_iter()
        .map(|e| ParseError {
            field: e.path.join("."),
            message: e.kind.to_string(),
            source: e
                .metadata
                .as_ref()
                .map(|m| source_name(m, &e.path.join("."))),
        })
        .collect()
}

/// Names the layer that supplied `field`: `TOML file /etc/framecast/broker.toml`,
/// `environment variable FRAMECAST_HTTP__LISTEN`, `flag --set http.listen`.
fn source_name(metadata: &Metadata, field: &str) -> String {
    match &metadata.source {
        Some(src) => format!("{} {}", metadata.name, src),
        None => {
            let keys: Vec<&str> = field.split('.').filter(|k| !k.is_empty()).collect();
            format!(
                "{} {}",
                metadata.name,
                metadata.interpolate(&Profile::Default, &keys)
            )
        }
    }
}

/// A layer of `key.path = value` overrides, named so errors say where a value came from.
struct Layer {
    kind: LayerKind,
    entries: Vec<(Vec<String>, Value)>,
}

#[derive(Clone, Copy)]
enum LayerKind {
    Env,
    Flags,
}

impl Layer {
    fn from_env(vars: &[(String, String)]) -> Self {
        let entries = vars
            .iter()
            .filter_map(|(name, value)| {
                let key = name.strip_prefix(ENV_PREFIX)?.to_ascii_lowercase();
                if RESERVED_ENV.contains(&key.as_str()) {
                    return None;
                }
                Some((
                    key.split("__").map(str::to_owned).collect(),
                    parse_value(value),
                ))
            })
            .collect();
        Self {
            kind: LayerKind::Env,
            entries,
        }
    }

    fn from_flags(flags: &[(String, String)]) -> Self {
        let entries = flags
            .iter()
            .map(|(key, value)| {
                (
                    key.split('.').map(str::to_owned).collect(),
                    parse_value(value),
                )
            })
            .collect();
        Self {
            kind: LayerKind::Flags,
            entries,
        }
    }
}

fn parse_value(s: &str) -> Value {
    // Infallible: anything that is not a number, bool, array or table stays a string.
    s.parse()
        .unwrap_or_else(|never: std::convert::Infallible| match never {})
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        match self.kind {
            LayerKind::Env => Metadata::named("environment variable").interpolater(
                |_: &Profile, keys: &[&str]| {
                    format!("{ENV_PREFIX}{}", keys.join("__").to_ascii_uppercase())
                },
            ),
            LayerKind::Flags => Metadata::named("flag")
                .interpolater(|_: &Profile, keys: &[&str]| format!("--set {}", keys.join("."))),
        }
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut root = Dict::new();
        for (path, value) in &self.entries {
            insert_path(&mut root, path, value.clone());
        }
        Ok(Profile::Default.collect(root))
    }
}

/// Sets `path` in `dict` to `value`, creating tables on the way and replacing non-tables.
fn insert_path(dict: &mut Dict, path: &[String], value: Value) {
    match path {
        [] => {}
        [last] => {
            dict.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = dict
                .entry(first.clone())
                .or_insert_with(|| Value::from(Dict::new()));
            if entry.as_dict().is_none() {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert_path(inner, rest, value);
            }
        }
    }
}

#[cfg(test)]
mod tests;
