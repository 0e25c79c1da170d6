//! The JSON log line: one object per event, `{"timestamp","level","fields":{..},"target"}`, the shape of
//! tracing-subscriber's JSON format (log pipelines built on it keep working).
//!
//! Why not that format itself: it serialises through `fmt::Write` one token at a time, checking each
//! token for UTF-8 on the way, which cost about 20,000 instructions per line (callgrind), more than the
//! SMTP session that the line reports. Here a line is built in a reused byte buffer, with serde_json
//! escaping the strings, and handed over in one piece.

use std::cell::RefCell;
use std::fmt;

use chrono::{SecondsFormat, Utc};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Formats events as JSON lines; see the module documentation.
#[derive(Debug, Default, Clone, Copy)]
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        thread_local! {
            static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        LINE.with(|cell| {
            // An event logged while a field of this one is being formatted finds the buffer taken: it
            // gets one of its own.
            let mut own = Vec::new();
            let mut borrowed = cell.try_borrow_mut();
            let line = match borrowed.as_deref_mut() {
                Ok(line) => line,
                Err(_) => &mut own,
            };
            line.clear();
            json_line(line, event);
            // Everything written is serde_json's output or ASCII, so this cannot fail; a line is
            // dropped rather than half written if it ever did.
            let text = std::str::from_utf8(line).map_err(|_| fmt::Error)?;
            writer.write_str(text)
        })
    }
}

/// Appends `event` as one JSON object and a newline to `line`.
fn json_line(line: &mut Vec<u8>, event: &Event<'_>) {
    // A record of the `log` crate (rustls, hickory) carries its own target; its `log.*` fields are how
    // tracing-log passes it, not fields of the record.
    let normalized = event.normalized_metadata();
    let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
    line.extend_from_slice(b"{\"timestamp\":\"");
    line.extend_from_slice(
        Utc::now()
            .to_rfc3339_opts(SecondsFormat::Micros, true)
            .as_bytes(),
    );
    line.extend_from_slice(b"\",\"level\":\"");
    line.extend_from_slice(meta.level().as_str().as_bytes());
    line.extend_from_slice(b"\",\"fields\":{");
    let mut fields = Fields { line, first: true };
    event.record(&mut fields);
    let line = fields.line;
    line.extend_from_slice(b"},\"target\":");
    string(line, meta.target());
    line.extend_from_slice(b"}\n");
}

/// Appends `s` as a JSON string.
fn string(line: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail, and a str always serialises.
    let _ = serde_json::to_writer(&mut *line, s);
}

/// Writes an event's fields as the members of a JSON object.
struct Fields<'a> {
    line: &'a mut Vec<u8>,
    first: bool,
}

impl Fields<'_> {
    fn key(&mut self, field: &Field) -> bool {
        if field.name().starts_with("log.") {
            return false;
        }
        if !self.first {
            self.line.push(b',');
        }
        self.first = false;
        string(self.line, field.name());
        self.line.push(b':');
        true
    }

    fn number(&mut self, field: &Field, value: impl serde::Serialize) {
        if self.key(field) {
            let _ = serde_json::to_writer(&mut *self.line, &value);
        }
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.key(field) {
            string(self.line, value);
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.number(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.number(field, value);
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.number(field, value);
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.number(field, value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // serde_json writes null for what JSON cannot hold (NaN, infinities).
        self.number(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.key(field) {
            self.line
                .extend_from_slice(if value { b"true" } else { b"false" });
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if !self.key(field) {
            return;
        }
        let mut text = String::new();
        let _ = fmt::write(&mut text, format_args!("{value:?}"));
        string(self.line, &text);
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().map_err(|_| io::ErrorKind::Other)?.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    fn lines(emit: impl FnOnce()) -> Vec<serde_json::Value> {
        let out = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .event_format(JsonLines)
            .with_writer(out.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = out.0.lock().expect("not poisoned").clone();
        String::from_utf8(bytes)
            .expect("UTF-8")
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
            .collect()
    }

    #[derive(Debug)]
    struct Odd;

    #[test]
    fn a_line_has_the_shape_of_tracing_subscribers_json_and_escapes_what_it_must() {
        let got = lines(|| {
            tracing::info!(
                queue_id = "00A1",
                size = 2117u64,
                delta = -3i64,
                ratio = 0.5f64,
                nan = f64::NAN,
                tls = true,
                reply = %"550 5.1.1 \"no\"\r\n\tuser",
                odd = ?Odd,
                "accepted {}", "ünïcode"
            );
            tracing::warn!("second");
        });
        assert_eq!(got.len(), 2);
        let first = &got[0];
        let keys: Vec<&str> = first
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, ["fields", "level", "target", "timestamp"]);
        assert_eq!(first["level"], "INFO");
        assert_eq!(first["target"], module_path!());
        let ts = first["timestamp"].as_str().expect("string");
        assert!(
            chrono::DateTime::parse_from_rfc3339(ts).is_ok() && ts.ends_with('Z') && ts.len() == 27,
            "{ts}"
        );
        let f = &first["fields"];
        assert_eq!(f["message"], "accepted ünïcode");
        assert_eq!(f["queue_id"], "00A1");
        assert_eq!(f["size"], 2117);
        assert_eq!(f["delta"], -3);
        assert_eq!(f["ratio"], 0.5);
        assert!(f["nan"].is_null());
        assert_eq!(f["tls"], true);
        assert_eq!(f["reply"], "550 5.1.1 \"no\"\r\n\tuser");
        assert_eq!(f["odd"], "Odd");
        assert_eq!(got[1]["level"], "WARN");
        assert_eq!(got[1]["fields"]["message"], "second");
    }
}
