//! The report: one list of blocks rendered twice, as `report.md` (images linked) and as a
//! self-contained `report.html` (images embedded as base64), so both always say the same.

use std::path::Path;

use base64::Engine;

use crate::error::{EvalError, Result};

/// A piece of the report.
#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    Heading(String),
    Paragraph(String),
    /// Header row, then rows; cells are plain text.
    Table(Vec<String>, Vec<Vec<String>>),
    /// A PNG in the output directory, with a caption.
    Image { file: String, caption: String },
}

/// Renders Markdown.
pub fn markdown(title: &str, blocks: &[Block]) -> String {
    let mut out = format!("# {title}\n\n");
    for b in blocks {
        match b {
            Block::Heading(h) => out.push_str(&format!("## {h}\n\n")),
            Block::Paragraph(p) => out.push_str(&format!("{p}\n\n")),
            Block::Table(head, rows) => {
                let cell = |s: &String| s.replace('|', "\\|");
                out.push_str(&format!("| {} |\n", head.iter().map(cell).collect::<Vec<_>>().join(" | ")));
                out.push_str(&format!("|{}\n", " --- |".repeat(head.len())));
                for r in rows {
                    out.push_str(&format!("| {} |\n", r.iter().map(cell).collect::<Vec<_>>().join(" | ")));
                }
                out.push('\n');
            }
            Block::Image { file, caption } => out.push_str(&format!("![{caption}]({file})\n\n*{caption}*\n\n")),
        }
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Renders one HTML page; images are read from `dir` and embedded.
pub fn html(title: &str, blocks: &[Block], dir: &Path) -> Result<String> {
    let mut out = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title>\n<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}\
         th{{background:#f3f3f3}}td:first-child{{text-align:left}}img{{max-width:100%}}figcaption{{color:#555}}</style></head><body>\n<h1>{t}</h1>\n",
        t = escape(title)
    );
    for b in blocks {
        match b {
            Block::Heading(h) => out.push_str(&format!("<h2>{}</h2>\n", escape(h))),
            Block::Paragraph(p) => out.push_str(&format!("<p>{}</p>\n", escape(p))),
            Block::Table(head, rows) => {
                out.push_str("<table><tr>");
                for h in head {
                    out.push_str(&format!("<th>{}</th>", escape(h)));
                }
                out.push_str("</tr>\n");
                for r in rows {
                    out.push_str("<tr>");
                    for c in r {
                        out.push_str(&format!("<td>{}</td>", escape(c)));
                    }
                    out.push_str("</tr>\n");
                }
                out.push_str("</table>\n");
            }
            Block::Image { file, caption } => {
                let path = dir.join(file);
                let bytes = std::fs::read(&path).map_err(|e| EvalError::io(&path, e))?;
                let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
                out.push_str(&format!("<figure><img alt=\"{c}\" src=\"data:image/png;base64,{b64}\"><figcaption>{c}</figcaption></figure>\n", c = escape(caption)));
            }
        }
    }
    out.push_str("</body></html>\n");
    Ok(out)
}

/// A number with 3 decimals, or "–" when undefined.
pub fn num(v: Option<f64>) -> String {
    v.filter(|x| x.is_finite()).map(|x| format!("{x:.3}")).unwrap_or_else(|| "–".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_renderings_carry_the_same_content() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.png"), b"\x89PNG").unwrap();
        let blocks = vec![
            Block::Heading("Scores".into()),
            Block::Table(vec!["repr".into(), "acc".into()], vec![vec!["model <1>".into(), num(Some(0.5))]]),
            Block::Image { file: "a.png".into(), caption: "fig".into() },
        ];
        let md = markdown("T", &blocks);
        assert!(md.contains("| model <1> | 0.500 |") && md.contains("![fig](a.png)"));
        let h = html("T", &blocks, dir.path()).unwrap();
        assert!(h.contains("<td>model &lt;1&gt;</td><td>0.500</td>"));
        assert!(h.contains("data:image/png;base64,iVBORw=="));
        assert_eq!(num(None), "–");
    }
}
