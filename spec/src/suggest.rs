//! "Did you mean" suggestions: the closest known name by edit distance, for misspelt keys and
//! choice values.

/// The candidate closest to `word`, if it is close enough to be a plausible typo.
pub(crate) fn closest<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let lower = word.to_ascii_lowercase();
    let mut best: Option<(usize, &'a str)> = None;
    for candidate in candidates {
        let distance = if candidate.eq_ignore_ascii_case(word) {
            0
        } else {
            levenshtein(&lower, &candidate.to_ascii_lowercase())
        };
        if best.is_none_or(|(d, _)| distance < d) {
            best = Some((distance, candidate));
        }
    }
    // One edit in short names, about a third of the letters in long ones.
    let limit = (word.chars().count() / 3).max(1);
    best.filter(|&(d, _)| d <= limit).map(|(_, c)| c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances() {
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(levenshtein("", "abc"), 3);
        assert_eq!(levenshtein("abc", "abc"), 0);
    }

    #[test]
    fn suggests_close_names_only() {
        let keys = ["learning_rate", "unet_lr", "lr_scheduler"];
        assert_eq!(closest("lerning_rate", keys), Some("learning_rate"));
        assert_eq!(closest("Learning_Rate", keys), Some("learning_rate"));
        assert_eq!(closest("lr_sheduler", keys), Some("lr_scheduler"));
        assert_eq!(closest("batch", keys), None);
        assert_eq!(
            closest("adamw8bit", ["AdamW", "AdamW8bit"]),
            Some("AdamW8bit")
        );
    }
}
