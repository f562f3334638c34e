//! The service guide's code excerpts against the code they are copied from. An excerpt that no
//! longer matches misleads the service author who copies it: four of kvdir's did, within the
//! stop that changed kvdir.

use std::path::Path;

/// The guide's Rust excerpts: the line each starts on, whether it is marked abridged (an
/// `<!-- abridged -->` line right before it), and its lines, trimmed, blank ones left out.
fn excerpts(guide: &str) -> Vec<(usize, bool, Vec<String>)> {
    let lines: Vec<&str> = guide.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() == "```rust" {
            let abridged = i > 0 && lines[i - 1].trim() == "<!-- abridged -->";
            let start = i + 1;
            let mut body = Vec::new();
            i += 1;
            while i < lines.len() && lines[i].trim() != "```" {
                if !lines[i].trim().is_empty() {
                    body.push(lines[i].trim().to_string());
                }
                i += 1;
            }
            out.push((start, abridged, body));
        }
        i += 1;
    }
    out
}

/// Every Rust source of the workspace, its lines trimmed, blank ones left out.
fn sources(dir: &Path, out: &mut Vec<(String, Vec<String>)>) {
    for entry in std::fs::read_dir(dir).expect("a readable directory") {
        let path = entry.expect("an entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() && !name.starts_with('.') && name != "target" {
            sources(&path, out);
        } else if name.ends_with(".rs") {
            let text = std::fs::read_to_string(&path).expect("a readable source");
            let lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
            out.push((path.display().to_string(), lines.map(String::from).collect()));
        }
    }
}

/// Whether `excerpt` lies in `file` line for line, or, `abridged`, in order with lines left out
/// (its comments are left out of the comparison: an abridged excerpt sums up the code's).
fn lies_in(file: &[String], excerpt: &[String], abridged: bool) -> bool {
    if abridged {
        let mut rest = file.iter();
        let code = excerpt.iter().filter(|line| !line.starts_with("//"));
        code.into_iter().all(|line| rest.any(|l| l == line))
    } else {
        file.windows(excerpt.len()).any(|w| w == excerpt)
    }
}

#[test]
fn every_excerpt_of_the_service_guide_is_in_the_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let guide = std::fs::read_to_string(root.join("docs/writing-a-service.md")).expect("the guide");
    let mut files = Vec::new();
    sources(root, &mut files);
    let excerpts = excerpts(&guide);
    assert!(excerpts.len() >= 15, "the guide's excerpts were found: {}", excerpts.len());
    let stale: Vec<String> = excerpts
        .iter()
        .filter(|(_, abridged, lines)| !files.iter().any(|(_, f)| lies_in(f, lines, *abridged)))
        .map(|(at, abridged, lines)| {
            let kind = if *abridged { "abridged" } else { "verbatim" };
            format!("line {at} ({kind}): {}", lines.first().map_or("", String::as_str))
        })
        .collect();
    assert!(stale.is_empty(), "excerpts of docs/writing-a-service.md not in the code: {stale:#?}");
}

#[test]
fn an_excerpt_is_found_only_as_it_lies() {
    let file: Vec<String> = ["fn a() {", "let x = 1;", "let y = 2;", "}"].map(String::from).into();
    let whole: Vec<String> = ["let x = 1;", "let y = 2;"].map(String::from).into();
    let gapped: Vec<String> = ["fn a() {", "}"].map(String::from).into();
    let changed: Vec<String> = ["let x = 1;", "let y = 3;"].map(String::from).into();
    assert!(lies_in(&file, &whole, false));
    assert!(!lies_in(&file, &gapped, false), "verbatim: no line left out");
    assert!(lies_in(&file, &gapped, true), "abridged: lines left out");
    assert!(!lies_in(&file, &changed, true), "a changed line is never in");
    let reversed: Vec<String> = ["let y = 2;", "let x = 1;"].map(String::from).into();
    assert!(!lies_in(&file, &reversed, true), "abridged: in order");
    let summed_up: Vec<String> = ["// x and y", "let x = 1;"].map(String::from).into();
    assert!(lies_in(&file, &summed_up, true), "abridged: its own comments");
    assert!(!lies_in(&file, &summed_up, false), "verbatim: the code's comments");
}
