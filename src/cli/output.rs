//! How the plugin prints: aligned tables like kubectl's, ages like kubectl's, colour
//! only on a terminal, and `-o json|yaml` documents.
//!
//! Written by hand rather than with a table or colour crate: kubectl's layout is a
//! few lines of padding, and the colours are three ANSI codes.

use std::io::IsTerminal;

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

/// `-o`: the human view, or a document for scripts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Tables and text for people.
    #[default]
    Text,
    /// One JSON document.
    Json,
    /// One YAML document.
    Yaml,
}

/// Serializes `value` as `-o json` or `-o yaml` asks (`None` for the text view).
pub fn document<T: Serialize>(format: Format, value: &T) -> Option<String> {
    match format {
        Format::Text => None,
        Format::Json => Some(
            serde_json::to_string_pretty(value).expect("plugin output always serializes") + "\n",
        ),
        Format::Yaml => {
            Some(serde_saphyr::to_string(value).expect("plugin output always serializes"))
        }
    }
}

/// What a cell means, for colour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tone {
    Plain,
    Good,
    Bad,
    Warn,
    Bold,
}

/// Colours on or off: on only when stdout is a terminal and `NO_COLOR` is unset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Style {
    pub colour: bool,
}

impl Style {
    pub fn detect() -> Self {
        let colour = std::io::stdout().is_terminal()
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
            && std::env::var("TERM").map_or(true, |t| t != "dumb");
        Self { colour }
    }

    pub const PLAIN: Self = Self { colour: false };

    pub fn paint(self, tone: Tone, text: &str) -> String {
        let code = match tone {
            Tone::Plain => return text.to_owned(),
            Tone::Good => "32",
            Tone::Bad => "31",
            Tone::Warn => "33",
            Tone::Bold => "1",
        };
        if self.colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
}

/// A kubectl-style table: upper-case headers, columns left-aligned and three spaces
/// apart, widths measured on the text without colour.
#[derive(Debug, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<(String, Tone)>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Self {
            headers: headers.iter().map(|h| h.to_uppercase()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<(String, Tone)>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self, style: Style) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, (text, _)) in row.iter().enumerate() {
                widths[i] = widths[i].max(text.chars().count());
            }
        }
        let line = |cells: Vec<(String, Tone)>| {
            let last = cells.len().saturating_sub(1);
            let mut out = String::new();
            for (i, (text, tone)) in cells.into_iter().enumerate() {
                out.push_str(&style.paint(tone, &text));
                if i < last {
                    let pad = widths[i] - text.chars().count() + 3;
                    out.push_str(&" ".repeat(pad));
                }
            }
            out.push('\n');
            out
        };
        let mut out = line(
            self.headers
                .iter()
                .map(|h| (h.clone(), Tone::Plain))
                .collect(),
        );
        for row in &self.rows {
            out.push_str(&line(row.clone()));
        }
        out
    }
}

/// kubectl's short human duration: `45s`, `12m`, `5h`, `29d`, `3y`.
pub fn short_duration(d: SignedDuration) -> String {
    let s = d.as_secs().unsigned_abs();
    match s {
        0..60 => format!("{s}s"),
        60..3_600 => format!("{}m", s / 60),
        3_600..86_400 => format!("{}h", s / 3600),
        86_400..31_536_000 => format!("{}d", s / 86_400),
        _ => format!("{}y", s / 31_536_000),
    }
}

/// A moment relative to `now`: `in 29d`, `5m ago`.
pub fn relative(at: Timestamp, now: Timestamp) -> String {
    let d = at.duration_since(now);
    if d.is_negative() {
        format!("{} ago", short_duration(d))
    } else {
        format!("in {}", short_duration(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_kubectl_ages() {
        let d = SignedDuration::from_secs;
        assert_eq!(short_duration(d(45)), "45s");
        assert_eq!(short_duration(d(119)), "1m");
        assert_eq!(short_duration(d(600)), "10m");
        assert_eq!(short_duration(d(5 * 3600)), "5h");
        assert_eq!(short_duration(d(30 * 86_400)), "30d");
        assert_eq!(short_duration(d(3 * 31_536_000)), "3y");
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(
            relative("2026-01-31T00:00:00Z".parse().unwrap(), now),
            "in 30d"
        );
        assert_eq!(
            relative("2025-12-31T23:55:00Z".parse().unwrap(), now),
            "5m ago"
        );
    }

    #[test]
    fn tables_align_on_the_text_not_the_colour_codes() {
        let mut table = Table::new(&["name", "ready"]);
        table.row(vec![
            ("a-long-name".into(), Tone::Plain),
            ("True".into(), Tone::Good),
        ]);
        table.row(vec![("b".into(), Tone::Plain), ("False".into(), Tone::Bad)]);
        assert_eq!(
            table.render(Style::PLAIN),
            "NAME          READY\na-long-name   True\nb             False\n"
        );
        let coloured = table.render(Style { colour: true });
        assert!(
            coloured.contains("b             \x1b[31mFalse\x1b[0m\n"),
            "{coloured:?}"
        );
    }

    #[test]
    fn no_escape_codes_without_colour() {
        for tone in [Tone::Good, Tone::Bad, Tone::Warn, Tone::Bold] {
            assert_eq!(Style::PLAIN.paint(tone, "x"), "x");
        }
    }
}
