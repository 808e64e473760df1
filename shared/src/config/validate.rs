//! The validation pass: rules over whole values, each failure naming its field.

use std::fmt;

/// One broken rule: `tiers.4k.framebuffer_mb = 8100: must be a multiple of 64`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The dotted path of the field.
    pub field: String,
    /// The value, as written in TOML.
    pub value: String,
    /// The rule it breaks, in words.
    pub rule: String,
    /// Which layer supplied the value, where known.
    pub source: Option<String>,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} = {}: {}", self.field, self.value, self.rule)?;
        if let Some(source) = &self.source {
            write!(f, " (from {source})")?;
        }
        Ok(())
    }
}

/// Collects the rules a value breaks, with field paths built up as it descends.
pub(crate) struct Checker<'a> {
    errors: &'a mut Vec<FieldError>,
    prefix: String,
}

impl<'a> Checker<'a> {
    pub(crate) fn new(errors: &'a mut Vec<FieldError>) -> Self {
        Self {
            errors,
            prefix: String::new(),
        }
    }

    /// A checker whose fields are under `section`.
    pub(crate) fn section(&mut self, section: &str) -> Checker<'_> {
        let prefix = self.path(section);
        Checker {
            errors: self.errors,
            prefix,
        }
    }

    /// The full path of `field` in this section.
    pub(crate) fn path(&self, field: &str) -> String {
        if self.prefix.is_empty() {
            field.to_owned()
        } else {
            format!("{}.{field}", self.prefix)
        }
    }

    /// Records that `field` (holding `value`) breaks `rule` unless `ok`.
    pub(crate) fn check(
        &mut self,
        ok: bool,
        field: &str,
        value: impl fmt::Debug,
        rule: impl Into<String>,
    ) {
        if !ok {
            self.fail(field, value, rule);
        }
    }

    /// Records that `field` (holding `value`) breaks `rule`.
    pub(crate) fn fail(&mut self, field: &str, value: impl fmt::Debug, rule: impl Into<String>) {
        self.errors.push(FieldError {
            field: self.path(field),
            // Debug output reads like TOML for the numbers, strings and paths checked here.
            value: format!("{value:?}"),
            rule: rule.into(),
            source: None,
        });
    }

    /// Records that the section itself (shown as `value`) breaks `rule`.
    pub(crate) fn fail_here(&mut self, value: &str, rule: impl Into<String>) {
        self.errors.push(FieldError {
            field: self.prefix.clone(),
            value: value.to_owned(),
            rule: rule.into(),
            source: None,
        });
    }

    /// `field` must lie in `min..=max`.
    pub(crate) fn range<T: PartialOrd + fmt::Debug + fmt::Display>(
        &mut self,
        field: &str,
        value: T,
        min: T,
        max: T,
    ) {
        let ok = value >= min && value <= max;
        self.check(ok, field, &value, format!("must be in {min}..={max}"));
    }
}
