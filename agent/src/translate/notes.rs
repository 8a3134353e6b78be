// SPDX-License-Identifier: MIT OR Apache-2.0
//! What one Service's translation has to say: problems, expected skips,
//! and notices.

/// What a [`Note`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NoteKind {
    /// Something not (fully) programmed: a warning and a Warning Event.
    Problem,
    /// Skipped by design (headless, ExternalName, an `ipMode: Proxy`
    /// address): not a problem, no warning, no Event.
    Skip,
    /// Programmed, but worth saying once (a NodePort outside
    /// `--node-port-range`).
    Notice,
}

/// A message of one Service's translation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Note {
    pub(super) kind: NoteKind,
    pub(super) message: String,
}

impl Note {
    pub(super) fn expected(message: &str) -> Self {
        Self { kind: NoteKind::Skip, message: message.into() }
    }

    pub(super) fn notice(message: String) -> Self {
        Self { kind: NoteKind::Notice, message }
    }
}

impl From<String> for Note {
    fn from(message: String) -> Self {
        Self { kind: NoteKind::Problem, message }
    }
}

impl From<&str> for Note {
    fn from(message: &str) -> Self {
        Self { kind: NoteKind::Problem, message: message.into() }
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
