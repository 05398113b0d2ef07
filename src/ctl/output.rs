//! Printing results as a table, YAML or JSON.

use serde::Serialize;

use super::Output;

/// Renders rows as left-aligned columns separated by three spaces (kubectl style).
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}   ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// Serialises `value` as YAML or JSON; `None` for [`Output::Table`].
pub(crate) fn structured<T: Serialize>(
    output: Output,
    value: &T,
) -> anyhow::Result<Option<String>> {
    Ok(match output {
        Output::Table => None,
        Output::Json => Some(serde_json::to_string_pretty(value)? + "\n"),
        Output::Yaml => Some(serde_saphyr::to_string(value)?),
    })
}

/// A text progress bar: `[#####-----] 1/2`.
pub(crate) fn progress_bar(done: i64, total: i64, width: usize) -> String {
    let filled = if total <= 0 {
        0
    } else {
        ((done.clamp(0, total) as usize) * width) / total as usize
    };
    format!(
        "[{}{}] {done}/{total}",
        "#".repeat(filled),
        "-".repeat(width - filled)
    )
}

/// A short age like kubectl's (`45s`, `3m`, `2h`, `5d`).
pub(crate) fn age(since: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>) -> String {
    let Some(t) = since else {
        return "<unknown>".into();
    };
    let now = k8s_openapi::jiff::Timestamp::now();
    let secs = now.duration_since(t.0).as_secs().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["NAME", "NODE"],
            &[
                vec!["a-long-name".into(), "n1".into()],
                vec!["b".into(), "n2".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME          NODE\na-long-name   n1\nb             n2\n"
        );
    }

    #[test]
    fn progress_bar_fills_in_proportion() {
        assert_eq!(progress_bar(1, 2, 10), "[#####-----] 1/2");
        assert_eq!(progress_bar(0, 0, 4), "[----] 0/0");
        assert_eq!(progress_bar(3, 3, 4), "[####] 3/3");
    }
}
