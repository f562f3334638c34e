//! What the benchmark examples `adaptation` and `migration` share: their arguments, and the
//! raw TCP baseline of their migration figures.

pub(crate) mod raw;

/// The number after `name` on the command line, `default` without one; a malformed number
/// stops the example with its name.
pub(crate) fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} takes a number, not {v:?}")))
        .unwrap_or(default)
}
