//! Writing benchmark results into `docs/benchmarks.md`: each benchmark owns one `## ` section
//! and replaces only that section, so benchmarks can be re-run one at a time.

use std::path::{Path, PathBuf};

/// A one-line description of this machine (CPU model, cores, memory, rustc), for results.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("unknown CPU")
        .to_string();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let rustc = std::process::Command::new("rustc")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "rustc unknown".into());
    format!("{model}, {cores} cores, {mem_gib:.0} GiB RAM, {rustc}")
}

/// The folder generated documents go to: `$WEFT_DOCS_DIR` when set (the benchmark runner,
/// `tests/bench/run.sh`, regenerates everything there and copies it into `docs/` once all
/// succeeded), else the workspace's `docs/`.
pub fn docs_dir() -> PathBuf {
    match std::env::var_os("WEFT_DOCS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs"),
    }
}

/// Where benchmarks draw their charts: `img/` of [`docs_dir`], linked from `benchmarks.md` as
/// `img/NAME.png`.
pub fn charts_dir() -> PathBuf {
    docs_dir().join("img")
}

/// The opening of `benchmarks.md` when it is written from scratch.
const BENCHMARKS_HEAD: &str = "# Weft benchmarks

Every figure here was printed by the command named in its section, on the machine named there.
`bash tests/bench/run.sh` regenerates this whole file, the plots in `img/` and
[reliability.md](reliability.md); `cargo bench -p weft-tests --bench NAME` reruns one section.
";

/// Replaces (or appends) the section `## {heading}` of `file` in [`docs_dir`] with `body`,
/// stamped with the command that produced it, the machine and the date.
pub fn write_section(file: &str, heading: &str, command: &str, body: &str) -> std::io::Result<()> {
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .unwrap_or_default();
    let section = format!(
        "## {heading}\n\nCommand: `{command}`. Measured {} on: {}.\n\n{}\n",
        date.trim(),
        machine(),
        body.trim_end()
    );
    replace_section(file, heading, &section)
}

/// Replaces (or appends) the section `## {heading}` of `file` in [`docs_dir`] (up to the next
/// `## ` heading) with `section`, which starts with that heading; creates the file if missing.
pub fn replace_section(file: &str, heading: &str, section: &str) -> std::io::Result<()> {
    let path = docs_dir().join(file);
    let existing = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BENCHMARKS_HEAD.to_string(),
        Err(e) => return Err(e),
    };
    let updated = spliced(&existing, heading, section);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, updated)
}

/// `existing` with its section `## {heading}` replaced by `section` (or `section` appended).
fn spliced(existing: &str, heading: &str, section: &str) -> String {
    let section = format!("{}\n", section.trim_end());
    let marker = format!("## {heading}\n");
    match existing.find(&marker) {
        Some(start) => {
            let rest = &existing[start + marker.len()..];
            let end = rest
                .find("\n## ")
                .map(|i| start + marker.len() + i + 1)
                .unwrap_or(existing.len());
            let separator = if end < existing.len() { "\n" } else { "" };
            format!(
                "{}{section}{separator}{}",
                &existing[..start],
                &existing[end..]
            )
        }
        None => format!("{}\n\n{section}", existing.trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::spliced;

    #[test]
    fn a_section_is_replaced_in_place_or_appended() {
        let doc = "# T\n\n## A\n\nold a\n\n## B\n\nold b\n";
        assert_eq!(
            spliced(doc, "A", "## A\n\nnew a"),
            "# T\n\n## A\n\nnew a\n\n## B\n\nold b\n"
        );
        assert_eq!(
            spliced(doc, "B", "## B\n\nnew b\n"),
            "# T\n\n## A\n\nold a\n\n## B\n\nnew b\n"
        );
        assert_eq!(
            spliced(doc, "C", "## C\n\nc"),
            "# T\n\n## A\n\nold a\n\n## B\n\nold b\n\n## C\n\nc\n"
        );
    }

    #[test]
    fn machine_line_names_cores() {
        assert!(super::machine().contains("cores"));
    }
}
