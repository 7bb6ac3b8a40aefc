//! The one way errors become text: an error followed by each of its
//! sources, so a message never has to repeat the error it wraps.

/// An error and its sources, joined with `: `.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("starting failed")]
        Start(#[source] Inner),
    }

    #[derive(Debug, thiserror::Error)]
    enum Inner {
        #[error("opening the file failed")]
        Open(#[source] std::io::Error),
    }

    #[test]
    fn joins_every_source_in_order() {
        let err = Outer::Start(Inner::Open(std::io::Error::other("no such file")));
        assert_eq!(
            error_chain(&err),
            "starting failed: opening the file failed: no such file"
        );
    }

    #[test]
    fn an_error_without_source_is_its_message() {
        assert_eq!(error_chain(&std::io::Error::other("gone")), "gone");
    }
}
