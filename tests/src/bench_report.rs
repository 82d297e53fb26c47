//! Writing benchmark results into `docs/benchmarks.md`: each benchmark owns one `## ` section
//! and replaces only that section, so benchmarks can be re-run one at a time.

use std::path::Path;

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

/// Replaces (or appends) the section `## {heading}` of the markdown file at `path`
/// (relative to the workspace root) with `body`, stamped with the command that produced it,
/// the machine and the date.
pub fn write_section(path: &str, heading: &str, command: &str, body: &str) -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let file = root.join(path);
    let existing = std::fs::read_to_string(&file).unwrap_or_else(|_| {
        "# Weft benchmarks\n\nEvery figure here was printed by the command named in its section, on the machine named there.\n".into()
    });
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
    let marker = format!("## {heading}\n");
    let updated = match existing.find(&marker) {
        Some(start) => {
            let rest = &existing[start + marker.len()..];
            let end = rest
                .find("\n## ")
                .map(|i| start + marker.len() + i + 1)
                .unwrap_or(existing.len());
            format!("{}{}{}", &existing[..start], section, &existing[end..])
        }
        None => format!("{}\n\n{section}", existing.trim_end()),
    };
    std::fs::write(file, updated)
}

#[cfg(test)]
mod tests {
    #[test]
    fn machine_line_names_cores() {
        assert!(super::machine().contains("cores"));
    }
}
