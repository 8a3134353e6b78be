// SPDX-License-Identifier: MIT OR Apache-2.0
//! What one Service's translation has to say: problems, and expected skips.

/// A message of one Service's translation: a problem, or a skip that is
/// expected by design (headless, ExternalName, an `ipMode: Proxy` address),
/// which is not a problem: no warning, no Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Note {
    pub(super) expected: bool,
    pub(super) message: String,
}

impl Note {
    pub(super) fn expected(message: &str) -> Self {
        Self { expected: true, message: message.into() }
    }
}

impl From<String> for Note {
    fn from(message: String) -> Self {
        Self { expected: false, message }
    }
}

impl From<&str> for Note {
    fn from(message: &str) -> Self {
        Self { expected: false, message: message.into() }
    }
}

/// The notes of one Service's translation, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Notes(pub(super) Vec<Note>);

impl Notes {
    pub(super) fn push(&mut self, n: impl Into<Note>) {
        self.0.push(n.into());
    }
}
