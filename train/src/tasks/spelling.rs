//! The spelling tasks of nanochat's tasks/spellingbee.py (in nanochat before 92d63d4), built from
//! an English word list: SpellingBee ("How many r are in strawberry?", answered by spelling the
//! word out, counting, then checking with the calculator's `.count`) and SimpleSpelling ("Spell
//! the word: apple" -> "apple:a,p,p,l,e"). Example `i` is drawn by `random.Random(i)` (test split:
//! `i + 10_000_000`), so the same index gives the same conversation as nanochat.
use std::io::BufRead;
use std::path::Path;

use anyhow::{Context, Result, bail};
use femtochat_model::tokenizer::{Content, Conversation, Part};

use super::humaneval::py_strip;
use super::{Task, check_index, extract_answer, open_text, user_assistant};
use crate::pyrandom::PyRandom;

const LETTERS: &str = "abcdefghijklmnopqrstuvwxyz";
/// Separates the seeds of the test examples from the train ones (more than the word count).
const TEST_SEED_OFFSET: i64 = 10_000_000;

/// nanochat's question templates (data augmentation, several languages).
const TEMPLATES: [&str; 51] = [
    "How many {letter} are in the word {word}",
    "How many {letter} are in {word}",
    "Count the number of {letter} in {word}",
    "How many times does {letter} appear in {word}",
    "What's the count of {letter} in {word}",
    "In the word {word}, how many {letter} are there",
    "How many letter {letter} are in the word {word}",
    "Count how many {letter} appear in {word}",
    "Tell me the number of {letter} in {word}",
    "How many occurrences of {letter} are in {word}",
    "Find the count of {letter} in {word}",
    "Can you count the {letter} letters in {word}",
    "What is the frequency of {letter} in {word}",
    "How many {letter}s are in {word}",
    "How many {letter}'s are in {word}",
    "Count all the {letter} in {word}",
    "How many times is {letter} in {word}",
    "Number of {letter} in {word}",
    "Total count of {letter} in {word}",
    "How many {letter} does {word} have",
    "How many {letter} does {word} contain",
    "What's the number of {letter} in {word}",
    "{word} has how many {letter}",
    "In {word}, count the {letter}",
    "How many {letter} appear in {word}",
    "Count the {letter} in {word}",
    "Give me the count of {letter} in {word}",
    "How many instances of {letter} in {word}",
    "Show me how many {letter} are in {word}",
    "Calculate the number of {letter} in {word}",
    "¿Cuántas {letter} hay en {word}?",
    "¿Cuántas veces aparece {letter} en {word}?",
    "Cuenta las {letter} en {word}",
    "¿Cuántas letras {letter} tiene {word}?",
    "{word}中有多少个{letter}",
    "{word}里有几个{letter}",
    "数一下{word}中的{letter}",
    "{word}这个词里有多少{letter}",
    "{word}에 {letter}가 몇 개 있나요",
    "{word}에서 {letter}의 개수는",
    "{word}에 {letter}가 몇 번 나오나요",
    "{word}라는 단어에 {letter}가 몇 개",
    "Combien de {letter} dans {word}",
    "Combien de fois {letter} apparaît dans {word}",
    "Compte les {letter} dans {word}",
    "Wie viele {letter} sind in {word}",
    "Wie oft kommt {letter} in {word} vor",
    "Zähle die {letter} in {word}",
    "{word}に{letter}は何個ありますか",
    "{word}の中に{letter}がいくつ",
    "{word}に{letter}が何回出てくる",
];

/// Which seeds examples are drawn with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    fn seed(self, i: usize) -> i64 {
        match self {
            Split::Train => i as i64,
            Split::Test => TEST_SEED_OFFSET + i as i64,
        }
    }
}

/// The word list, one word per line, stripped (words_alpha.txt, optionally gzipped).
pub fn load_words(path: &Path) -> Result<Vec<String>> {
    let mut words = Vec::new();
    for (n, line) in open_text(path)?.lines().enumerate() {
        let line = line.with_context(|| format!("{}:{}", path.display(), n + 1))?;
        words.push(py_strip(&line).to_string());
    }
    if words.iter().all(|w| w.is_empty()) {
        bail!("{}: the word list is empty", path.display());
    }
    Ok(words)
}

/// Python's `choice` over a non-empty slice (the word list and the constants are never empty;
/// a word is non-empty when it is drawn, or the draw fails).
fn pick<'a, T>(rng: &mut PyRandom, seq: &'a [T], what: &str) -> Result<&'a T> {
    rng.choice(seq).with_context(|| format!("cannot choose from an empty {what}"))
}

pub struct SpellingBee {
    words: Vec<String>,
    size: usize,
    split: Split,
}

impl SpellingBee {
    /// `size` examples (nanochat: 80 000 for SFT, 256 for the test set) from a word list.
    pub fn new(words: Vec<String>, size: usize, split: Split) -> SpellingBee {
        SpellingBee { words, size, split }
    }

    /// The word, the letter and the question of example `i`, with the assistant's parts.
    fn example(&self, i: usize) -> Result<(String, Vec<Part>)> {
        check_index(self, i)?;
        let mut rng = PyRandom::new(self.split.seed(i));
        let word = pick(&mut rng, &self.words, "word list")?.clone();
        let chars: Vec<char> = word.chars().collect();
        let letters: Vec<char> = LETTERS.chars().collect();
        let letter = if rng.random() < 0.9 {
            *pick(&mut rng, &chars, "word")?
        } else {
            *pick(&mut rng, &letters, "alphabet")?
        };
        let count = chars.iter().filter(|&&c| c == letter).count();

        let mut template = pick(&mut rng, &TEMPLATES, "template list")?.to_string();
        if rng.random() < 0.3 {
            template = template.to_lowercase();
        }
        let quotes = ["", "'", "\""];
        let lq = pick(&mut rng, &quotes, "quotes")?;
        let wq = pick(&mut rng, &quotes, "quotes")?;
        let mut user = template
            .replace("{letter}", &format!("{lq}{letter}{lq}"))
            .replace("{word}", &format!("{wq}{word}{wq}"));
        if rng.random() < 0.5 {
            user.push('?');
        }

        let spelled: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        let mut manual = format!(
            "We are asked to find the number '{letter}' in the word '{word}'. Let me try a manual approach first.\n\nFirst spell the word out:\n{word}:{}\n\nThen count the occurrences of '{letter}':\n",
            spelled.join(",")
        );
        let mut running = 0;
        for (k, &c) in chars.iter().enumerate() {
            if c == letter {
                running += 1;
                // No space between the index and the letter: " a" and "a" are different tokens.
                manual.push_str(&format!("{}:{c} hit! count={running}\n", k + 1));
            } else {
                manual.push_str(&format!("{}:{c}\n", k + 1));
            }
        }
        manual.push_str(&format!("\nThis gives us {running}."));
        let parts = vec![
            Part::Text(manual),
            Part::Text("\n\nLet me double check this using Python:\n\n".into()),
            Part::Python(format!("'{word}'.count('{letter}')")),
            Part::PythonOutput(count.to_string()),
            Part::Text(format!(
                "\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"
            )),
        ];
        Ok((user, parts))
    }
}

impl Task for SpellingBee {
    fn name(&self) -> &str {
        "spellingbee"
    }
    fn len(&self) -> usize {
        self.size
    }
    fn conversation(&self, i: usize) -> Result<Conversation> {
        let (user, parts) = self.example(i)?;
        Ok(user_assistant(user, Content::Parts(parts)))
    }
    fn evaluate(&self, i: usize, completion: &str) -> Result<bool> {
        let (_, parts) = self.example(i)?;
        let last = match parts.last() {
            Some(Part::Text(t)) => t.as_str(),
            _ => "",
        };
        Ok(extract_answer(completion) == extract_answer(last))
    }
}

pub struct SimpleSpelling {
    words: Vec<String>,
    size: usize,
    split: Split,
}

impl SimpleSpelling {
    /// `size` examples; the words are reordered by `random.Random(42).shuffle` first (a different
    /// order from SpellingBee's), as nanochat does.
    pub fn new(mut words: Vec<String>, size: usize, split: Split) -> SimpleSpelling {
        PyRandom::new(42).shuffle(&mut words);
        SimpleSpelling { words, size, split }
    }
}

impl Task for SimpleSpelling {
    fn name(&self) -> &str {
        "simplespelling"
    }
    fn len(&self) -> usize {
        self.size
    }
    fn conversation(&self, i: usize) -> Result<Conversation> {
        check_index(self, i)?;
        let mut rng = PyRandom::new(self.split.seed(i));
        let word = pick(&mut rng, &self.words, "word list")?;
        let spelled: Vec<String> = word.chars().map(|c| c.to_string()).collect();
        Ok(user_assistant(
            format!("Spell the word: {word}"),
            Content::Text(format!("{word}:{}", spelled.join(","))),
        ))
    }
}
