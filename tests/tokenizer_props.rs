//! Properties of the tokenizer on arbitrary input: lossless round trips, batch/thread
//! independence, streaming decode, and loaders that reject garbage without panicking.
use std::path::Path;

use femtochat::model::tokenizer::{
    SPECIAL_TOKENS, SPLIT_PATTERN, StreamDecoder, Tokenizer, parse_tiktoken,
};
use proptest::prelude::*;

fn tok() -> &'static Tokenizer {
    static TOK: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
    TOK.get_or_init(|| {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tokenizer/ranks_2048.tiktoken");
        let ranks = parse_tiktoken(&std::fs::read_to_string(p).unwrap()).unwrap();
        Tokenizer::new(ranks, &SPECIAL_TOKENS, SPLIT_PATTERN).unwrap()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn round_trip(s in any::<String>()) {
        let ids = tok().encode(&s);
        prop_assert_eq!(tok().decode(&ids).unwrap(), s);
    }

    /// Streaming one token at a time yields the same text, and only complete UTF-8 on the way.
    #[test]
    fn streaming_decode(s in "\\PC{0,40}") {
        let ids = tok().encode(&s);
        let mut dec = StreamDecoder::default();
        let mut out = String::new();
        for &id in &ids {
            out.push_str(&dec.push(tok(), id).unwrap());
        }
        out.push_str(&dec.finish());
        prop_assert_eq!(out, s);
    }

    #[test]
    fn batch_and_threads_do_not_change_ids(texts in proptest::collection::vec(any::<String>(), 0..12)) {
        let one: Vec<Vec<u32>> = texts.iter().map(|t| tok().encode(t)).collect();
        prop_assert_eq!(&tok().encode_batch(&texts), &one);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        prop_assert_eq!(&pool.install(|| tok().encode_batch(&texts)), &one);
    }

    /// Decoding any id sequence never panics: unknown ids are errors, cut characters are U+FFFD.
    #[test]
    fn decode_any_ids(ids in proptest::collection::vec(0u32..3000, 0..40)) {
        let r = tok().decode(&ids);
        prop_assert_eq!(r.is_ok(), ids.iter().all(|&i| (i as usize) < tok().vocab_size()));
        let mut dec = StreamDecoder::default();
        for &id in &ids {
            let _ = dec.push(tok(), id);
        }
    }

    /// The ranks loader rejects garbage with an error, never a panic.
    #[test]
    fn loader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = parse_tiktoken(&text);
    }
}

#[test]
fn loader_errors_name_the_problem() {
    assert!(parse_tiktoken("AA== 0\nAA== 1\n").unwrap_err().contains("twice"));
    assert!(parse_tiktoken("AA== 0\nAQ== 2\n").unwrap_err().contains("gaps"));
    assert!(parse_tiktoken("!!! 0\n").unwrap_err().contains("base64"));
    assert!(parse_tiktoken("AA==\n").unwrap_err().contains("line 1"));
    let dir = tempfile::tempdir().unwrap();
    tok().save(dir.path()).unwrap();
    let back = Tokenizer::load(dir.path()).unwrap();
    assert_eq!(back.encode("Hello there, world!"), tok().encode("Hello there, world!"));
    std::fs::write(dir.path().join("tokenizer.json"), b"{").unwrap();
    assert!(Tokenizer::load(dir.path()).unwrap_err().to_string().contains("tokenizer.json"));
}
