//! Audit records out of the store, as CSV or JSON, for billing.
//!
//! Both formats carry the same fields under the same names, one row or object per ended
//! session, in the order given (the store returns them by end time):
//!
//! | field | value |
//! | --- | --- |
//! | `session_id` | the session's UUIDv7, hyphenated |
//! | `tenant`, `game`, `tier`, `genre` | names (lowercase ASCII letters, digits, `-`, `_`, `.`) |
//! | `node`, `gpu` | where it ran; empty (CSV) or `null` (JSON) if it never held a slot |
//! | `created_at` | when the request was accepted |
//! | `started_at` | when it first held a slot, the start of billing; empty / `null` if never |
//! | `ended_at` | when it ended |
//! | `end_reason` | `released`, `expired`, `idle`, `max-length`, `node-lost`, `drained` or `error` |
//! | `session_seconds` | seconds from `started_at` to `ended_at` (millisecond precision) |
//! | `gpu_seconds` | `session_seconds × compute_sixteenths / 16`: the billing unit |
//! | `framebuffer_mb` | framebuffer the slot held, MiB |
//! | `compute_sixteenths` | compute the slot held, sixteenths of one GPU |
//!
//! Times are RFC 3339 in UTC with milliseconds (`2023-11-14T22:13:20.000Z`, from
//! [`Timestamp::rfc3339`]).
//!
//! CSV follows RFC 4180: a header row with the field names, CRLF line ends, and a field that
//! holds a comma, a double quote, CR or LF enclosed in double quotes with its quotes doubled.
//! JSON is one array of objects, one object per line.

use std::borrow::Cow;
use std::fmt;
use std::io::{self, Write};
use std::str::FromStr;

use serde::Serialize;

use framecast_shared::state::EndReason;
use framecast_shared::time::Timestamp;

use super::records::AuditRecord;

/// The export's field names, in CSV column order.
pub const FIELDS: [&str; 15] = [
    "session_id",
    "tenant",
    "game",
    "tier",
    "genre",
    "node",
    "gpu",
    "created_at",
    "started_at",
    "ended_at",
    "end_reason",
    "session_seconds",
    "gpu_seconds",
    "framebuffer_mb",
    "compute_sixteenths",
];

/// How [`export`] writes audit records; parsed from a CLI flag (`csv` or `json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// RFC 4180 CSV with a header row.
    Csv,
    /// A JSON array of objects.
    Json,
}

/// A format name that is neither `csv` nor `json`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown export format {0:?}; expected `csv` or `json`")]
pub struct UnknownExportFormat(pub String);

impl FromStr for ExportFormat {
    type Err = UnknownExportFormat;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("csv") {
            Ok(Self::Csv)
        } else if s.eq_ignore_ascii_case("json") {
            Ok(Self::Json)
        } else {
            Err(UnknownExportFormat(s.to_owned()))
        }
    }
}

impl fmt::Display for ExportFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Self::Csv => "csv",
            Self::Json => "json",
        })
    }
}

/// Writes `records` to `out` in `format` (see the [module documentation](self) for the
/// schema). Each row is one `write_all`; wrap a file or socket in a `BufWriter`.
pub fn export(
    records: &[AuditRecord],
    format: ExportFormat,
    out: &mut impl Write,
) -> io::Result<()> {
    match format {
        ExportFormat::Csv => write_csv(records, out),
        ExportFormat::Json => write_json(records, out),
    }
}

/// One exported record: the fields of [`FIELDS`], in that order, shared by both formats so
/// they cannot disagree.
#[derive(Serialize)]
struct Row<'a> {
    session_id: String,
    tenant: &'a str,
    game: &'a str,
    tier: &'a str,
    genre: &'a str,
    node: Option<&'a str>,
    gpu: Option<&'a str>,
    created_at: String,
    started_at: Option<String>,
    ended_at: String,
    end_reason: EndReason,
    session_seconds: f64,
    gpu_seconds: f64,
    framebuffer_mb: u64,
    compute_sixteenths: u8,
}

impl<'a> Row<'a> {
    fn new(r: &'a AuditRecord) -> Self {
        Row {
            session_id: r.session_id.to_string(),
            tenant: r.tenant.as_str(),
            game: r.game.as_str(),
            tier: r.tier.as_str(),
            genre: r.genre.as_str(),
            node: r.node.as_ref().map(|n| n.as_str()),
            gpu: r.gpu.as_ref().map(|g| g.as_str()),
            created_at: r.created_at.rfc3339(),
            started_at: r.started_at.map(Timestamp::rfc3339),
            ended_at: r.ended_at.rfc3339(),
            end_reason: r.end_reason,
            session_seconds: r.session_seconds,
            gpu_seconds: r.gpu_seconds,
            framebuffer_mb: r.framebuffer_mb,
            compute_sixteenths: r.compute_sixteenths,
        }
    }

    /// The fields as CSV cells, in [`FIELDS`] order.
    fn cells(&self) -> [Cow<'_, str>; 15] {
        [
            Cow::Borrowed(self.session_id.as_str()),
            Cow::Borrowed(self.tenant),
            Cow::Borrowed(self.game),
            Cow::Borrowed(self.tier),
            Cow::Borrowed(self.genre),
            Cow::Borrowed(self.node.unwrap_or("")),
            Cow::Borrowed(self.gpu.unwrap_or("")),
            Cow::Borrowed(self.created_at.as_str()),
            Cow::Borrowed(self.started_at.as_deref().unwrap_or("")),
            Cow::Borrowed(self.ended_at.as_str()),
            Cow::Owned(self.end_reason.to_string()),
            Cow::Owned(self.session_seconds.to_string()),
            Cow::Owned(self.gpu_seconds.to_string()),
            Cow::Owned(self.framebuffer_mb.to_string()),
            Cow::Owned(self.compute_sixteenths.to_string()),
        ]
    }
}

fn write_csv(records: &[AuditRecord], out: &mut impl Write) -> io::Result<()> {
    let mut line = String::new();
    push_csv_line(&mut line, FIELDS.iter().copied());
    out.write_all(line.as_bytes())?;
    for record in records {
        line.clear();
        let row = Row::new(record);
        push_csv_line(&mut line, row.cells().iter().map(|c| c.as_ref()));
        out.write_all(line.as_bytes())?;
    }
    Ok(())
}

/// Appends one CSV record, CRLF-terminated, to `line`.
fn push_csv_line<'a>(line: &mut String, cells: impl Iterator<Item = &'a str>) {
    for (i, cell) in cells.enumerate() {
        if i > 0 {
            line.push(',');
        }
        line.push_str(&csv_field(cell));
    }
    line.push_str("\r\n");
}

/// `s` as an RFC 4180 field: as is, or in double quotes with its quotes doubled when it holds
/// a comma, a double quote, CR or LF.
fn csv_field(s: &str) -> Cow<'_, str> {
    if s.contains([',', '"', '\r', '\n']) {
        Cow::Owned(format!("\"{}\"", s.replace('"', "\"\"")))
    } else {
        Cow::Borrowed(s)
    }
}

fn write_json(records: &[AuditRecord], out: &mut impl Write) -> io::Result<()> {
    if records.is_empty() {
        return out.write_all(b"[]\n");
    }
    let mut buf = Vec::new();
    for (i, record) in records.iter().enumerate() {
        buf.clear();
        buf.extend_from_slice(if i == 0 { b"[\n" } else { b",\n" });
        serde_json::to_writer(&mut buf, &Row::new(record))?;
        out.write_all(&buf)?;
    }
    out.write_all(b"\n]\n")
}

#[cfg(test)]
mod tests {
    use framecast_shared::ids::{GpuId, NodeId};

    use super::super::records::tests::session;
    use super::*;

    fn records() -> Vec<AuditRecord> {
        let placed = session(1_700_000_000_000, 1);
        let mut queued = session(1_700_000_000_500, 2);
        queued.placed_at = None;
        queued.node = None;
        queued.gpu = None;
        vec![
            AuditRecord::from_session(
                &placed,
                Timestamp::from_millis(1_700_000_061_250),
                EndReason::MaxLength,
            ),
            AuditRecord::from_session(
                &queued,
                Timestamp::from_millis(1_700_000_100_000),
                EndReason::Expired,
            ),
        ]
    }

    fn render(records: &[AuditRecord], format: ExportFormat) -> String {
        let mut out = Vec::new();
        export(records, format, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn csv_fields_are_quoted_only_when_they_must_be() {
        assert_eq!(csv_field("arena-shooter"), "arena-shooter");
        assert_eq!(csv_field(""), "");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
        assert_eq!(csv_field("cr\r"), "\"cr\r\"");
        assert_eq!(csv_field("player, \"one\"\n"), "\"player, \"\"one\"\"\n\"");
        let mut line = String::new();
        push_csv_line(&mut line, ["x", "a,\"b\"", ""].into_iter());
        assert_eq!(line, "x,\"a,\"\"b\"\"\",\r\n");
    }

    #[test]
    fn csv_has_the_header_and_one_line_per_record() {
        let records = records();
        let csv = render(&records, ExportFormat::Csv);
        let lines: Vec<&str> = csv.split_terminator("\r\n").collect();
        assert_eq!(lines.len(), 3, "{csv}");
        assert_eq!(
            lines[0],
            "session_id,tenant,game,tier,genre,node,gpu,created_at,started_at,ended_at,\
             end_reason,session_seconds,gpu_seconds,framebuffer_mb,compute_sixteenths"
        );
        let placed = &records[0];
        assert_eq!(
            lines[1],
            format!(
                "{},acme,arena-shooter,1080p,fps,gpu-host-01,\
                 GPU-8f0c2a4e-1d2b-4c3d-9e8f-0a1b2c3d4e5f,2023-11-14T22:13:20.000Z,\
                 2023-11-14T22:13:21.000Z,2023-11-14T22:14:21.250Z,max-length,60.25,15.0625,\
                 4096,4",
                placed.session_id
            )
        );
        assert_eq!(
            lines[2],
            format!(
                "{},acme,arena-shooter,1080p,fps,,,2023-11-14T22:13:20.500Z,,\
                 2023-11-14T22:15:00.000Z,expired,0,0,4096,4",
                records[1].session_id
            )
        );
        // Every line has one cell per field (no cell here needs quoting).
        for line in &lines {
            assert_eq!(line.split(',').count(), FIELDS.len(), "{line}");
        }
    }

    #[test]
    fn host_ids_with_colons_stay_unquoted() {
        let mut records = records();
        records[0].node = Some(NodeId::new("host:1").unwrap());
        records[0].gpu = Some(GpuId::new("0000:3b:00.0").unwrap());
        let csv = render(&records, ExportFormat::Csv);
        assert!(csv.contains(",host:1,0000:3b:00.0,"), "{csv}");
    }

    #[test]
    fn json_is_an_array_of_objects_with_the_csv_field_names() {
        let records = records();
        let json = render(&records, ExportFormat::Json);
        let parsed: Vec<serde_json::Map<String, serde_json::Value>> =
            serde_json::from_str(&json).unwrap();
        assert_eq!(parsed.len(), records.len());
        for object in &parsed {
            let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
            let mut fields = FIELDS.to_vec();
            keys.sort_unstable();
            fields.sort_unstable();
            assert_eq!(keys, fields);
        }
        let first = &parsed[0];
        assert_eq!(first["session_id"], records[0].session_id.to_string());
        assert_eq!(first["started_at"], "2023-11-14T22:13:21.000Z");
        assert_eq!(first["end_reason"], "max-length");
        assert_eq!(first["session_seconds"], 60.25);
        assert_eq!(first["gpu_seconds"], 15.0625);
        assert_eq!(first["compute_sixteenths"], 4);
        assert_eq!(parsed[1]["node"], serde_json::Value::Null);
        assert_eq!(parsed[1]["started_at"], serde_json::Value::Null);

        assert_eq!(render(&[], ExportFormat::Json), "[]\n");
        let empty: Vec<serde_json::Value> =
            serde_json::from_str(&render(&[], ExportFormat::Json)).unwrap();
        assert!(empty.is_empty());
        assert_eq!(
            render(&[], ExportFormat::Csv).lines().count(),
            1,
            "an empty CSV export is its header"
        );
    }

    #[test]
    fn formats_parse_and_print_as_their_flag_values() {
        for format in [ExportFormat::Csv, ExportFormat::Json] {
            assert_eq!(format.to_string().parse::<ExportFormat>(), Ok(format));
        }
        assert_eq!("JSON".parse::<ExportFormat>(), Ok(ExportFormat::Json));
        let err = "xml".parse::<ExportFormat>().unwrap_err();
        assert!(err.to_string().contains("`csv` or `json`"), "{err}");
    }

    #[test]
    fn a_failing_writer_is_an_error_not_a_panic() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::StorageFull, "disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        for format in [ExportFormat::Csv, ExportFormat::Json] {
            let err = export(&records(), format, &mut Full).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        }
    }
}
