//! Generated ids -> the text a client sees: incremental detokenisation with OpenAI `stop` strings,
//! which may span several tokens, so text that could still become a stop string is held back.

use crate::error::Result;
use crate::runtime::tokenizer::{TextStream, TextTokenizer};

pub struct StopText {
    stream: TextStream,
    /// Text decoded so far (cut at a stop string once one appears).
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    stops: Vec<String>,
    longest: usize,
    /// A stop string was found: the generation is over.
    pub stopped: bool,
}

impl StopText {
    pub fn new(stops: Vec<String>) -> Self {
        let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        StopText {
            stream: TextStream::default(),
            text: String::new(),
            emitted: 0,
            stops,
            longest,
            stopped: false,
        }
    }

    /// Adds one generated id; returns the text that is now certain (possibly empty).
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        if let Some(piece) = self.stream.push(tok, id)? {
            self.text.push_str(&piece);
        }
        Ok(self.take(false))
    }

    /// The rest of the text once generation ended.
    pub fn finish(&mut self) -> String {
        self.take(true)
    }

    /// The whole text handed out so far.
    pub fn text(&self) -> &str {
        self.text.get(..self.emitted).unwrap_or(&self.text)
    }

    fn take(&mut self, all: bool) -> String {
        // A stop string can only start where it could not have been seen before.
        let from = floor_boundary(&self.text, self.emitted.saturating_sub(self.longest));
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.text.get(from..)?.find(s.as_str()).map(|i| from + i))
            .min();
        let end = match hit {
            Some(i) => {
                self.stopped = true;
                self.text.truncate(i);
                i
            }
            None if all => self.text.len(),
            // Hold back what could be the start of a stop string.
            None => floor_boundary(
                &self.text,
                self.text
                    .len()
                    .saturating_sub(self.longest.saturating_sub(1)),
            ),
        };
        let end = end.max(self.emitted);
        let out = self.text.get(self.emitted..end).unwrap_or("").to_string();
        self.emitted = end;
        out
    }
}

/// The largest char boundary of `s` at or below `i`.
fn floor_boundary(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds text pieces directly (the tokenizer is exercised by the server tests).
    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, String, bool) {
        let mut s = StopText::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for p in pieces {
            s.text.push_str(p);
            out.push(s.take(false));
            if s.stopped {
                break;
            }
        }
        let last = s.finish();
        (out, last, s.stopped)
    }

    #[test]
    fn stop_strings_across_pieces_are_cut_and_never_shown() {
        let (out, last, stopped) = run(&["END"], &["hello E", "N", "D tail"]);
        assert!(stopped);
        assert_eq!(out.concat() + &last, "hello ");
        assert!(out.iter().all(|p| !p.contains('E')), "{out:?}");
    }

    #[test]
    fn text_without_stops_streams_whole() {
        let (out, last, stopped) = run(&[], &["a", "bc", "é"]);
        assert!(!stopped);
        assert_eq!(out, ["a", "bc", "é"]);
        assert_eq!(last, "");
        // With a stop string, a possible prefix waits, then comes out at the end.
        let (out, last, stopped) = run(&["xyz"], &["abx", "y"]);
        assert!(!stopped);
        assert_eq!(out.concat(), "ab");
        assert_eq!(last, "xy");
    }

    #[test]
    fn the_earliest_stop_wins_and_multibyte_text_is_never_split() {
        let (out, last, _) = run(&["ü!", "b"], &["aüü", "!b"]);
        assert_eq!(out.concat() + &last, "aü");
    }
}
