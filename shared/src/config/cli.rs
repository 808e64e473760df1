//! The command-line side of configuration, shared by the broker and the agent.

use std::path::PathBuf;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{ConfigError, Sources, Validate, load, to_toml};

/// Flags every binary with a config file takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArgs {
    /// The TOML config file; built-in defaults apply to anything it leaves out.
    #[arg(long, short = 'c', env = "FRAMECAST_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Override one field, after the file and FRAMECAST_* variables: `--set http.listen=0.0.0.0:8080`.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_override)]
    pub overrides: Vec<(String, String)>,
}

impl ConfigArgs {
    /// Loads and validates `T` from these flags, the process environment and the file.
    pub fn load<T>(&self) -> Result<T, ConfigError>
    where
        T: Default + Serialize + DeserializeOwned + Validate,
    {
        self.load_with_env(None)
    }

    /// Like [`ConfigArgs::load`] with the environment given, for tests.
    pub fn load_with_env<T>(&self, env: Option<Vec<(String, String)>>) -> Result<T, ConfigError>
    where
        T: Default + Serialize + DeserializeOwned + Validate,
    {
        load(&Sources {
            file: self.config.as_deref(),
            env,
            flags: self.overrides.clone(),
        })
    }

    /// What `check-config` reports: the effective configuration as TOML when `print` is set,
    /// else a one-line confirmation naming the file.
    pub fn check<T>(&self, print: bool) -> Result<String, ConfigError>
    where
        T: Default + Serialize + DeserializeOwned + Validate,
    {
        let config: T = self.load()?;
        if print {
            return to_toml(&config).map_err(|e| {
                ConfigError::Parse(vec![super::ParseError {
                    field: String::new(),
                    message: format!("cannot print the configuration: {e}"),
                    source: None,
                }])
            });
        }
        Ok(match &self.config {
            Some(path) => format!("{}: ok", path.display()),
            None => "built-in defaults: ok".to_owned(),
        })
    }
}

/// The `check-config` subcommand both binaries offer.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CheckConfigArgs {
    /// Where the configuration comes from.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Print the effective configuration as TOML.
    #[arg(long)]
    pub print: bool,
}

impl CheckConfigArgs {
    /// Loads and validates `T`, prints the outcome and returns the exit code (see [`report`]).
    pub fn run<T>(&self) -> std::process::ExitCode
    where
        T: Default + Serialize + DeserializeOwned + Validate,
    {
        report(self.config.check::<T>(self.print))
    }
}

/// Prints the outcome of [`ConfigArgs::check`] the way the binaries' `check-config` does:
/// the report on stdout and exit code 0, or one `error:` line per problem on stderr and exit
/// code 2.
#[allow(clippy::print_stdout, clippy::print_stderr)] // the command's output
pub fn report(outcome: Result<String, ConfigError>) -> std::process::ExitCode {
    match outcome {
        Ok(text) => {
            println!("{}", text.trim_end());
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            for line in error.lines() {
                eprintln!("error: {line}");
            }
            std::process::ExitCode::from(2)
        }
    }
}

/// Parses `key.path=value`.
fn parse_override(s: &str) -> Result<(String, String), String> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(format!(
            "expected a dotted key such as http.listen, got {key:?}"
        ));
    }
    Ok((key.to_owned(), value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_parse_as_dotted_key_and_value() {
        assert_eq!(
            parse_override("http.listen=0.0.0.0:80"),
            Ok(("http.listen".into(), "0.0.0.0:80".into()))
        );
        assert_eq!(
            parse_override("region=a=b"),
            Ok(("region".into(), "a=b".into()))
        );
        assert!(parse_override("no-equals").is_err());
        assert!(parse_override("a..b=1").is_err());
        assert!(parse_override("=1").is_err());
    }
}
