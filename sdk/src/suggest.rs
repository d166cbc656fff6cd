//! "Did you mean ...?" for mistyped names (plugins, parameters, config keys).

/// Edit distance counting a swap of two adjacent characters as one edit (optimal string
/// alignment), since "mtp" for "mpt" is as likely a typo as one wrong letter.
pub fn edit_distance(a: &str, b: &str) -> usize {
    strsim::osa_distance(a, b)
}

/// The candidate nearest to `name`, if it is close enough to be a plausible typo
/// (at most a third of the name's length, and at least one edit allowed).
pub fn nearest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (edit_distance(name, c), c))
        .filter(|&(d, _)| d <= limit)
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

/// `", did you mean `x`?"` or nothing, to append to an error message.
pub fn did_you_mean<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    nearest(name, candidates).map(|c| format!("; did you mean `{c}`?")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances_by_hand() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("min_ce", "min_ce"), 0);
        assert_eq!(edit_distance("mtp", "mpt"), 1);
    }

    #[test]
    fn suggests_only_plausible_names() {
        let names = ["min_ce", "avg_ce", "entropy_weighted"];
        assert_eq!(nearest("mince", names), Some("min_ce"));
        assert_eq!(nearest("avg_cee", names), Some("avg_ce"));
        assert_eq!(nearest("dtw", names), None);
    }
}
