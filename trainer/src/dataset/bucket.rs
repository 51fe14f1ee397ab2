//! Aspect-ratio bucketing as kohya's `make_bucket_resolutions` and `BucketManager.select_bucket`
//! do it: predefined buckets of about `resolution`'s area, or (with `bucket_no_upscale`) one
//! bucket per image size, never enlarging the image.

use std::collections::BTreeSet;

/// A bucket size as (width, height) in pixels.
pub type Reso = (u32, u32);

/// kohya's `model_util.make_bucket_resolutions`: sizes on a `divisible` grid whose area is at
/// most `max_reso`'s, with sides in `[min_size, max_size]`, plus the largest square; sorted.
pub fn make_bucket_resolutions(
    max_reso: Reso,
    min_size: u32,
    max_size: u32,
    divisible: u32,
) -> Vec<Reso> {
    let max_area = max_reso.0 as u64 * max_reso.1 as u64;
    let div = divisible.max(1) as u64;
    let mut resos = BTreeSet::new();

    let side = ((max_area as f64).sqrt() / div as f64).floor() as u64 * div;
    resos.insert((side as u32, side as u32));

    let mut width = min_size as u64;
    while width <= max_size as u64 {
        let height = (max_size as u64).min((max_area / width) / div * div);
        if height >= min_size as u64 {
            resos.insert((width as u32, height as u32));
            resos.insert((height as u32, width as u32));
        }
        width += div;
    }
    resos.into_iter().collect()
}

/// Where one image goes: its bucket, the size it is resized to before cropping to the bucket,
/// and the bucket's aspect-ratio error (bucket ar − image ar).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketChoice {
    pub reso: Reso,
    pub resized: Reso,
    pub ar_error: f64,
}

/// Chooses buckets for images. `Predefined` covers both kohya's bucketed mode without
/// `bucket_no_upscale` and the no-bucket mode (a single predefined bucket = `resolution`).
#[derive(Debug, Clone)]
pub enum BucketSelector {
    Predefined {
        resos: Vec<Reso>,
        aspect_ratios: Vec<f64>,
    },
    NoUpscale {
        max_area: u64,
        reso_steps: u32,
    },
}

impl BucketSelector {
    pub fn predefined(resos: Vec<Reso>) -> Self {
        let aspect_ratios = resos.iter().map(|&(w, h)| w as f64 / h as f64).collect();
        BucketSelector::Predefined {
            resos,
            aspect_ratios,
        }
    }

    pub fn no_upscale(max_reso: Reso, reso_steps: u32) -> Self {
        BucketSelector::NoUpscale {
            max_area: max_reso.0 as u64 * max_reso.1 as u64,
            reso_steps: reso_steps.max(1),
        }
    }

    /// kohya's `select_bucket` for an image of `width` x `height` (both non-zero). `None` when
    /// `bucket_no_upscale` leaves a side under one step (kohya would make a zero-sized bucket).
    pub fn select(&self, width: u32, height: u32) -> Option<BucketChoice> {
        let (iw, ih) = (width as f64, height as f64);
        let aspect = iw / ih;
        let (reso, resized) = match self {
            BucketSelector::Predefined {
                resos,
                aspect_ratios,
            } => {
                let reso = if resos.contains(&(width, height)) {
                    (width, height)
                } else {
                    // np.argmin: the first of equal errors wins.
                    let mut best = 0;
                    let mut best_err = f64::INFINITY;
                    for (i, ar) in aspect_ratios.iter().enumerate() {
                        let err = (ar - aspect).abs();
                        if err < best_err {
                            best = i;
                            best_err = err;
                        }
                    }
                    *resos.get(best)?
                };
                let ar_reso = reso.0 as f64 / reso.1 as f64;
                // Scale so the image covers the bucket; the long side is cropped later.
                let scale = if aspect > ar_reso {
                    reso.1 as f64 / ih
                } else {
                    reso.0 as f64 / iw
                };
                let resized = (round_half_up(iw * scale), round_half_up(ih * scale));
                (reso, resized)
            }
            BucketSelector::NoUpscale {
                max_area,
                reso_steps,
            } => {
                let steps = *reso_steps;
                let resized = if width as u64 * height as u64 > *max_area {
                    let area = *max_area as f64;
                    let rw = (area * aspect).sqrt();
                    let rh = area / rw;
                    let round = |x: f64| {
                        let x = round_half_up(x);
                        x - x % steps
                    };
                    // Round either the width or the height to the step grid, whichever keeps
                    // the aspect ratio closer.
                    let bw = round(rw);
                    let bh_w = round(bw as f64 / aspect);
                    let ar_w = bw as f64 / bh_w as f64;
                    let bh = round(rh);
                    let bw_h = round(bh as f64 * aspect);
                    let ar_h = bw_h as f64 / bh as f64;
                    if (ar_w - aspect).abs() < (ar_h - aspect).abs() {
                        (bw, round_half_up(bw as f64 / aspect))
                    } else {
                        (round_half_up(bh as f64 * aspect), bh)
                    }
                } else {
                    (width, height)
                };
                let reso = (resized.0 - resized.0 % steps, resized.1 - resized.1 % steps);
                (reso, resized)
            }
        };
        if reso.0 == 0 || reso.1 == 0 || resized.0 < reso.0 || resized.1 < reso.1 {
            return None;
        }
        let ar_error = reso.0 as f64 / reso.1 as f64 - aspect;
        Some(BucketChoice {
            reso,
            resized,
            ar_error,
        })
    }
}

/// Python's `int(x + 0.5)` for non-negative x.
fn round_half_up(x: f64) -> u32 {
    (x + 0.5).floor() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn square_image_in_square_bucket() {
        let sel = BucketSelector::predefined(make_bucket_resolutions((512, 512), 256, 1024, 64));
        let c = sel.select(1024, 1024).unwrap();
        assert_eq!(c.reso, (512, 512));
        assert_eq!(c.resized, (512, 512));
        assert_eq!(c.ar_error, 0.0);
    }

    #[test]
    fn no_upscale_keeps_small_images() {
        let sel = BucketSelector::no_upscale((512, 512), 64);
        let c = sel.select(300, 200).unwrap();
        assert_eq!(c.resized, (300, 200));
        assert_eq!(c.reso, (256, 192));
        assert!(sel.select(50, 300).is_none());
    }
}
