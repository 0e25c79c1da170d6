//! The classifier against the reply corpus: every documented reply in `tests/fixtures/replies/*.yaml` (the
//! tune set; `holdback/` is never read here) is classified with the built-in rules, the MX host included,
//! and the verdicts are scored against the corpus's labels. Prints per-category precision and recall, the
//! accuracy, and every miss; asserts an accuracy of at least 0.97 on the documented entries. Synthetic
//! entries (replies only third parties quote) are scored apart and not asserted.
//!
//!     cargo test -p herald-relay --test replies -- --nocapture

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use herald_relay::outcome::{Category, Classifier, Reply};

#[derive(Debug, Deserialize)]
struct Entry {
    code: u16,
    enhanced: Option<String>,
    text: String,
    category: Category,
    source: String,
    #[serde(default)]
    mx: Option<String>,
    #[serde(default)]
    synthetic: bool,
}

/// The tune set: the YAML files directly in the corpus directory, never those under `holdback/`.
fn tune_set() -> Vec<(String, Entry)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/replies");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus files in {}", dir.display());
    let mut out = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).expect("corpus file");
        let entries: Vec<Entry> =
            serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.extend(entries.into_iter().map(|e| (name.clone(), e)));
    }
    out
}

#[derive(Default)]
struct Score {
    /// (true positives, false positives, false negatives) per category.
    per_category: BTreeMap<&'static str, (u32, u32, u32)>,
    right: u32,
    total: u32,
    misses: Vec<String>,
}

impl Score {
    fn add(&mut self, file: &str, e: &Entry, got: Category) {
        self.total += 1;
        if got == e.category {
            self.right += 1;
            self.per_category.entry(got.as_str()).or_default().0 += 1;
        } else {
            self.per_category.entry(got.as_str()).or_default().1 += 1;
            self.per_category.entry(e.category.as_str()).or_default().2 += 1;
            self.misses.push(format!(
                "{file}: {} {} {:?} (mx {}): want {}, got {got}",
                e.code,
                e.enhanced.as_deref().unwrap_or("-"),
                e.text,
                e.mx.as_deref().unwrap_or("-"),
                e.category
            ));
        }
    }

    fn accuracy(&self) -> f64 {
        f64::from(self.right) / f64::from(self.total.max(1))
    }

    fn print(&self, name: &str) {
        println!(
            "{name}: {}/{} right, accuracy {:.3}",
            self.right,
            self.total,
            self.accuracy()
        );
        println!(
            "  {:<24} {:>9} {:>9} {:>5}",
            "category", "precision", "recall", "n"
        );
        for (cat, (tp, fp, fnn)) in &self.per_category {
            let ratio = |a: u32, b: u32| {
                if a + b == 0 {
                    "-".to_owned()
                } else {
                    format!("{:.3}", f64::from(a) / f64::from(a + b))
                }
            };
            println!(
                "  {cat:<24} {:>9} {:>9} {:>5}",
                ratio(*tp, *fp),
                ratio(*tp, *fnn),
                tp + fnn
            );
        }
        for m in &self.misses {
            println!("  miss: {m}");
        }
    }
}

#[test]
fn the_classifier_reads_documented_replies_as_the_corpus_labels_them() {
    let classifier = Classifier::builtin();
    let (mut documented, mut synthetic) = (Score::default(), Score::default());
    for (file, e) in tune_set() {
        assert!(
            e.source.starts_with("https://"),
            "{file}: source {:?}",
            e.source
        );
        let reply = Reply::new(e.code, e.enhanced.as_deref(), &e.text).with_mx(e.mx.as_deref());
        let (_, got) = classifier.classify(&reply);
        if e.synthetic {
            synthetic.add(&file, &e, got);
        } else {
            documented.add(&file, &e, got);
        }
    }
    documented.print("documented (tune set)");
    synthetic.print("synthetic (tune set, not asserted)");
    assert!(documented.total > 0, "no documented entries");
    assert!(
        documented.accuracy() >= 0.97,
        "accuracy {:.3} on documented replies is below 0.97",
        documented.accuracy()
    );
}
