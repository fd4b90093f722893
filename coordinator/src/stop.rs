//! Stop sequences over streamed text.
//!
//! A stop string may arrive split across tokens, so text is held back while
//! its end could still be the start of a stop string, and released once it
//! cannot. When a stop string completes, everything from its first byte on
//! is dropped: the client never sees any part of it.

/// Most stop sequences a request may give (OpenAI's limit).
pub const MAX_STOP_SEQUENCES: usize = 4;

/// Text released by [`StopMatcher::push`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Text safe to show.
    pub text: String,
    /// Whether a stop sequence ended the generation.
    pub stopped: bool,
}

/// Holds back text that might begin a stop sequence.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), pending: String::new(), stopped: false }
    }

    /// Adds generated text; returns what may be shown now.
    pub fn push(&mut self, piece: &str) -> Released {
        if self.stopped {
            return Released { text: String::new(), stopped: true };
        }
        self.pending.push_str(piece);
        let first_stop = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min();
        if let Some(at) = first_stop {
            self.stopped = true;
            let text = self.pending[..at].to_string();
            self.pending.clear();
            return Released { text, stopped: true };
        }
        let keep = self.held_back();
        let cut = self.pending.len() - keep;
        let text = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        Released { text, stopped: false }
    }

    /// Releases whatever is held back (the generation ended without a stop sequence).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Bytes at the end of `pending` that are a proper prefix of some stop string
    /// (always on a character boundary, since stop strings are whole text).
    fn held_back(&self) -> usize {
        let p = &self.pending;
        self.stops
            .iter()
            .map(|s| {
                (1..s.len().min(p.len() + 1))
                    .rev()
                    .find(|&n| s.is_char_boundary(n) && p.is_char_boundary(p.len() - n) && p.ends_with(&s[..n]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| (*s).to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let r = m.push(p);
            out.push_str(&r.text);
            if r.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn stop_sequences_are_never_emitted() {
        let cases: [(&[&str], &[&str], &str, bool); 7] = [
            (&["\n\n"], &["Paris.", "\n", "\nThe"], "Paris.", true),
            (&["END"], &["a E", "N", "D b"], "a ", true),
            (&["END"], &["a E", "N", "x"], "a ENx", false),
            (&["stop", "top"], &["s", "to", "p"], "", true),
            (&["é!"], &["caf", "é", "!"], "caf", true),
            (&[], &["plain ", "text"], "plain text", false),
            (&["xyz"], &["x", "y"], "xy", false),
        ];
        for (stops, pieces, want, stopped) in cases {
            assert_eq!(run(stops, pieces), (want.to_string(), stopped), "{stops:?} {pieces:?}");
        }
    }

    #[test]
    fn text_is_held_only_while_it_could_start_a_stop() {
        let mut m = StopMatcher::new(vec!["###".into()]);
        assert_eq!(m.push("ab#").text, "ab");
        assert_eq!(m.push("#c").text, "##c");
        assert_eq!(m.push("ü#").text, "ü");
    }
}
