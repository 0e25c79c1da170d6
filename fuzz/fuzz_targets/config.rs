//! The relay's config file: `herald_config::Config::parse`, YAML parsing and validation together.
//!
//! Checked: no input panics or overflows the stack, and a config that parses serializes (as the operator
//! writes the relay's config file) to text that parses back to the same config.

#![no_main]

use herald_config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::parse(text) else {
        return;
    };
    let written = serde_saphyr::to_string(&config).expect("a parsed config serializes");
    match Config::parse(&written) {
        Ok(again) => assert_eq!(
            again, config,
            "the written config reads back differently:\n{written}"
        ),
        Err(e) => panic!("the written config does not parse: {e}\n{written}"),
    }
});
