//! The one table printer: columns padded to their widest cell, two spaces apart, the last
//! column unpadded. Cells are escaped for the terminal (names come from the other side).

pub fn render(header: Option<&[&str]>, rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            r.iter()
                .map(|c| jmp_protocol::name::escape(c).into_owned())
                .collect()
        })
        .collect();
    let cols = header
        .map(|h| h.len())
        .unwrap_or(0)
        .max(rows.iter().map(|r| r.len()).max().unwrap_or(0));
    let mut w = vec![0usize; cols];
    if let Some(h) = header {
        for (i, c) in h.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut s = String::new();
    let mut line = |cells: Vec<&str>| {
        let n = cells.len();
        for (i, c) in cells.into_iter().enumerate() {
            if i + 1 == n {
                s.push_str(c);
            } else {
                s.push_str(c);
                for _ in c.chars().count()..w[i] + 2 {
                    s.push(' ');
                }
            }
        }
        s.push('\n');
    };
    if let Some(h) = header {
        line(h.to_vec());
    }
    for r in &rows {
        line(r.iter().map(|c| c.as_str()).collect());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_escapes_are_defused() {
        let rows = vec![
            vec![
                "console".to_string(),
                "serial".into(),
                "/dev/jmp/x/console".into(),
            ],
            vec!["ssh".to_string(), "tcp".into(), "127.0.0.1:2222".into()],
        ];
        assert_eq!(
            render(None, &rows),
            "console  serial  /dev/jmp/x/console\nssh      tcp     127.0.0.1:2222\n"
        );
        assert_eq!(
            render(Some(&["NAME", "KIND"]), &[vec!["a".into(), "b".into()]]),
            "NAME  KIND\na     b\n"
        );
        let bad = render(None, &[vec!["x\u{1b}[2J".into()]]);
        assert!(!bad.contains('\u{1b}'), "{bad:?}");
    }
}
