//! Generated kohya `N_name` folders of captioned checkerboard images.

use std::path::Path;

/// The checkerboards' colours, with the names their captions give them.
pub const COLOURS: [([u8; 3], &str); 4] = [
    ([220, 30, 30], "red"),
    ([30, 200, 40], "green"),
    ([40, 40, 230], "blue"),
    ([230, 220, 30], "yellow"),
];

/// Writes `images` checkerboards of `size` (16-pixel squares of one of [`COLOURS`] in turn and
/// near-white) into `dir` as `0.png`, `1.png`, ..., each with the caption file `i.txt` that
/// `caption(i, colour name)` gives (none where it gives `None`).
pub fn checkerboards(
    dir: &Path,
    size: (u32, u32),
    images: usize,
    caption: impl Fn(usize, &str) -> Option<String>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let (w, h) = size;
    for (i, (rgb, name)) in COLOURS.iter().enumerate().take(images) {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            if (x / 16 + y / 16) % 2 == (i as u32) % 2 {
                image::Rgb(*rgb)
            } else {
                image::Rgb([250, 250, 250])
            }
        });
        img.save(dir.join(format!("{i}.png")))?;
        if let Some(text) = caption(i, name) {
            std::fs::write(dir.join(format!("{i}.txt")), text)?;
        }
    }
    Ok(())
}
