//! Tables for the terminal, drawn by comfy-table: aligned columns, long cells wrapped to
//! the width. Files and run summaries use Markdown instead (`fusellm_core::table`).

use comfy_table::{presets::UTF8_FULL, CellAlignment, ContentArrangement, Table};

/// The width long cells wrap at: a terminal's usual width, since no terminal is asked.
const WIDTH: u16 = 120;

/// An empty table with this header.
pub fn terminal<const N: usize>(header: [&str; N]) -> Table {
    let mut table = Table::new();
    table.load_style(UTF8_FULL).set_content_arrangement(ContentArrangement::Dynamic).set_width(WIDTH);
    table.set_header(header);
    table
}

/// Numbers read best right-aligned.
pub fn align_right(table: &mut Table, columns: std::ops::Range<usize>) {
    for c in columns {
        if let Some(column) = table.column_mut(c) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
}
