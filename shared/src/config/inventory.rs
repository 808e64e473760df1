//! `gpus.toml`: a simulated GPU inventory, for hosts without an NVIDIA driver (development,
//! CI, load tests). Each entry names a model from the built-in table.
//!
//! ```toml
//! [[gpus]]
//! model = "NVIDIA L4"     # or a unique suffix: "l4"
//! count = 2
//! mode = "equal-size"     # optional: the first of equal-size, exclusive the model supports
//! ```

use serde::{Deserialize, Serialize};

use super::validate::Checker;
use super::{FieldError, Validate};
use crate::gpu::{GpuMode, GpuSpec, models};

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedGpus {
    /// Groups of identical GPUs.
    #[serde(default)]
    pub gpus: Vec<SimulatedGpuGroup>,
}

/// `[[gpus]]`: `count` GPUs of one model in one mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedGpuGroup {
    /// A model of [`models::all`], by name or unique suffix.
    pub model: String,
    /// How many.
    #[serde(default = "one")]
    pub count: u16,
    /// Their sharing mode; the model's first of equal-size and exclusive when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<GpuMode>,
}

fn one() -> u16 {
    1
}

/// Most simulated GPUs one host may have.
pub const MAX_SIMULATED_GPUS: u16 = 64;

impl SimulatedGpuGroup {
    /// The model and mode this group describes, if both are valid.
    pub fn resolve(&self) -> Option<(GpuSpec, GpuMode)> {
        let spec = models::find(&self.model)?;
        let mode = match self.mode {
            Some(m) if spec.supports(m) => m,
            Some(_) => return None,
            None => [GpuMode::EqualSize, GpuMode::Exclusive]
                .into_iter()
                .find(|m| spec.supports(*m))?,
        };
        Some((spec, mode))
    }
}

impl Validate for SimulatedGpus {
    fn validate(&self, errors: &mut Vec<FieldError>) {
        let mut c = Checker::new(errors);
        if self.gpus.is_empty() {
            c.fail_here(
                "[]",
                "a simulated inventory needs at least one [[gpus]] entry",
            );
            return;
        }
        let total: u32 = self.gpus.iter().map(|g| u32::from(g.count)).sum();
        for (i, group) in self.gpus.iter().enumerate() {
            let mut g = c.section(&format!("gpus.{i}"));
            g.range("count", group.count, 1, MAX_SIMULATED_GPUS);
            match models::find(&group.model) {
                None => g.fail(
                    "model",
                    &group.model,
                    format!(
                        "not a known GPU model (known: {})",
                        models::NAMES.join(", ")
                    ),
                ),
                Some(spec) => {
                    if let Some(mode) = group.mode.filter(|m| !spec.supports(*m)) {
                        let supported: Vec<String> =
                            spec.modes.iter().map(ToString::to_string).collect();
                        g.fail(
                            "mode",
                            mode.to_string(),
                            format!("{} supports {}", spec.model, supported.join(", ")),
                        );
                    }
                }
            }
        }
        if total > u32::from(MAX_SIMULATED_GPUS) {
            c.fail_here(
                &total.to_string(),
                format!("at most {MAX_SIMULATED_GPUS} GPUs in all"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigError, Sources, load};

    fn parse(text: &str) -> Result<SimulatedGpus, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpus.toml");
        std::fs::write(&path, text).unwrap();
        load(&Sources {
            file: Some(&path),
            env: Some(Vec::new()),
            flags: Vec::new(),
        })
    }

    #[test]
    fn groups_resolve_to_models_and_modes() {
        let inv = parse(
            "[[gpus]]\nmodel = \"l4\"\ncount = 2\n[[gpus]]\nmodel = \"NVIDIA GeForce RTX 4090\"\n",
        )
        .unwrap();
        let resolved: Vec<(String, GpuMode)> = inv
            .gpus
            .iter()
            .map(|g| g.resolve().map(|(s, m)| (s.model, m)).unwrap())
            .collect();
        assert_eq!(
            resolved,
            [
                ("NVIDIA L4".into(), GpuMode::EqualSize),
                ("NVIDIA GeForce RTX 4090".into(), GpuMode::Exclusive)
            ]
        );
    }

    #[test]
    fn bad_entries_name_the_field() {
        let err = parse("[[gpus]]\nmodel = \"Voodoo2\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("gpus.0.model = \"Voodoo2\": not a known GPU model (known: NVIDIA L4,"),
            "{err}"
        );
        let err = parse("[[gpus]]\nmodel = \"l4\"\nmode = \"mig\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "gpus.0.mode = \"mig\": NVIDIA L4 supports exclusive, equal-size, mixed-size"
            ),
            "{err}"
        );
        let err = parse("[[gpus]]\nmodel = \"l4\"\ncount = 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("gpus.0.count = 0: must be in 1..=64"),
            "{err}"
        );
        let err = parse("").unwrap_err().to_string();
        assert!(err.contains("at least one [[gpus]] entry"), "{err}");
        let err = parse("[[gpus]]\nmodle = \"l4\"\n").unwrap_err().to_string();
        assert!(err.contains("unknown field"), "{err}");
    }
}
