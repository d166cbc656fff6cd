//! Three text domains generated procedurally, each with structure a small model can learn:
//! arithmetic (the answers follow from the operands), a tiny programming language (the
//! printed values follow from the assignments), and sentences of a stochastic grammar
//! (agreement between subject and verb, fixed word order).

use fusellm_sdk::rng::Rng;

/// The demo's domains, in table order.
pub const DOMAINS: [&str; 3] = ["arithmetic", "code", "grammar"];

/// One document of `domain`.
pub fn document(domain: &str, rng: &mut Rng) -> String {
    match domain {
        "arithmetic" => arithmetic(rng),
        "code" => code(rng),
        _ => grammar(rng),
    }
}

fn pick<'a>(rng: &mut Rng, items: &[&'a str]) -> &'a str {
    items[rng.below(items.len() as u32) as usize]
}

/// Lines like `37 + 45 = 82`.
fn arithmetic(rng: &mut Rng) -> String {
    let lines = 6 + rng.below(6);
    (0..lines)
        .map(|_| {
            let (a, b) = (rng.below(100) as i64, rng.below(100) as i64);
            match rng.below(3) {
                0 => format!("{a} + {b} = {}", a + b),
                1 => format!("{} - {b} = {}", a + b, a),
                _ => format!("{} * {} = {}", a % 13, b % 13, (a % 13) * (b % 13)),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A program of assignments and prints, each print followed by its value as a comment.
fn code(rng: &mut Rng) -> String {
    let names = ["a", "b", "c", "x", "y", "n", "total", "count"];
    let mut vars: Vec<(&str, i64)> = Vec::new();
    let mut lines = Vec::new();
    for _ in 0..5 + rng.below(5) {
        let name = pick(rng, &names);
        if !vars.is_empty() && rng.below(3) == 0 {
            let (v, value) = vars[rng.below(vars.len() as u32) as usize];
            lines.push(format!("print({v})  # {value}"));
            continue;
        }
        let (expr, value) = match vars.is_empty() || rng.below(2) == 0 {
            true => {
                let k = rng.below(20) as i64;
                (k.to_string(), k)
            }
            false => {
                let (v, value) = vars[rng.below(vars.len() as u32) as usize];
                let k = 1 + rng.below(9) as i64;
                match rng.below(2) {
                    0 => (format!("{v} + {k}"), value + k),
                    _ => (format!("{v} * {k}"), value * k),
                }
            }
        };
        lines.push(format!("{name} = {expr}"));
        vars.retain(|(n, _)| *n != name);
        vars.push((name, value));
    }
    lines.join("\n")
}

/// Sentences `Det (Adj) Noun Verb Det (Adj) Noun (Prep Det Noun) .` with number agreement.
fn grammar(rng: &mut Rng) -> String {
    const NOUNS: [(&str, &str); 8] = [
        ("dog", "dogs"),
        ("cat", "cats"),
        ("child", "children"),
        ("bird", "birds"),
        ("teacher", "teachers"),
        ("farmer", "farmers"),
        ("ball", "balls"),
        ("river", "rivers"),
    ];
    const VERBS: [(&str, &str); 6] = [
        ("sees", "see"),
        ("likes", "like"),
        ("follows", "follow"),
        ("finds", "find"),
        ("carries", "carry"),
        ("watches", "watch"),
    ];
    const ADJS: [&str; 6] = ["small", "old", "red", "quiet", "happy", "tall"];
    const PREPS: [&str; 4] = ["near", "under", "behind", "beside"];
    let phrase = |rng: &mut Rng, plural: bool| {
        let det = if plural { pick(rng, &["the", "some", "two"]) } else { pick(rng, &["the", "a", "one"]) };
        let noun = NOUNS[rng.below(NOUNS.len() as u32) as usize];
        let noun = if plural { noun.1 } else { noun.0 };
        match rng.below(2) {
            0 => format!("{det} {} {noun}", pick(rng, &ADJS)),
            _ => format!("{det} {noun}"),
        }
    };
    let sentences = 3 + rng.below(4);
    (0..sentences)
        .map(|_| {
            let plural = rng.below(2) == 0;
            let subject = phrase(rng, plural);
            let verb = VERBS[rng.below(VERBS.len() as u32) as usize];
            let object_plural = rng.below(2) == 0;
            let object = phrase(rng, object_plural);
            let tail = match rng.below(3) {
                0 => {
                    let place_plural = rng.below(2) == 0;
                    format!(" {} {}", pick(rng, &PREPS), phrase(rng, place_plural))
                }
                _ => String::new(),
            };
            let mut s = format!("{subject} {} {object}{tail}.", if plural { verb.1 } else { verb.0 });
            s[..1].make_ascii_uppercase();
            s
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_deterministic_and_consistent() {
        let mut rng = Rng::new(1);
        let doc = document("arithmetic", &mut rng);
        for line in doc.lines() {
            let (lhs, rhs) = line.split_once(" = ").unwrap();
            let parts: Vec<&str> = lhs.split(' ').collect();
            let (a, b): (i64, i64) = (parts[0].parse().unwrap(), parts[2].parse().unwrap());
            let expected = match parts[1] {
                "+" => a + b,
                "-" => a - b,
                _ => a * b,
            };
            assert_eq!(rhs.parse::<i64>().unwrap(), expected, "{line}");
        }
        assert_eq!(document("code", &mut Rng::new(4)), document("code", &mut Rng::new(4)));
        assert!(document("grammar", &mut Rng::new(2)).ends_with('.'));
    }
}
