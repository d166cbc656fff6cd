//! Markdown tables, as results.md, sweep.md and the run summaries write them: a header
//! line, a `|---|` rule, one line per row, cells unpadded (the README quotes them so).

/// The table with this header and these rows (each as many cells as the header).
pub fn markdown<H: AsRef<str>, C: AsRef<str>>(header: &[H], rows: impl IntoIterator<Item = Vec<C>>) -> String {
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        cells.fold(String::from("|"), |line, cell| line + " " + cell + " |") + "\n"
    };
    let mut out = line(&mut header.iter().map(AsRef::as_ref));
    out += &format!("|{}\n", "---|".repeat(header.len()));
    for row in rows {
        out += &line(&mut row.iter().map(AsRef::as_ref));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn rows_under_a_rule() {
        let rows = vec![vec!["a", "1.0000"], vec!["b", ""]];
        assert_eq!(
            super::markdown(&["model", "average"], rows),
            "| model | average |\n|---|---|\n| a | 1.0000 |\n| b |  |\n"
        );
    }
}
