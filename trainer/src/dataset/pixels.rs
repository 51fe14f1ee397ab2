//! Image files to training tensors the way kohya prepares them: header-only size probing,
//! decode to 8-bit RGB (alpha dropped, EXIF orientation ignored, as PIL's `convert("RGB")`),
//! resize to the bucket's cover size, crop to the bucket, optional flip, then f32 CHW in [-1, 1].
//!
//! Resizing follows `library/utils.resize_image`: when neither side grows kohya uses OpenCV's
//! `INTER_AREA`, otherwise PIL's `LANCZOS`. [`lanczos_resize`] reproduces Pillow's fixed-point
//! resampler bit for bit. [`area_resize`] follows `INTER_AREA`: integer ratios as OpenCV computes
//! them (bit for bit), other ratios as a pixel-area average in f64 rounded once; OpenCV sums
//! those in f32, so a value within f32 noise of a half can land one 8-bit level apart.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::{ImageReader, RgbImage};
use rand::Rng;

use super::bucket::BucketChoice;
use crate::confine::AllowedRoots;
use crate::{Error, Result};

/// How an image larger than its bucket after resizing is cut down to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CropMode {
    Center,
    Random,
}

impl CropMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CropMode::Center => "center",
            CropMode::Random => "random",
        }
    }
}

fn bad_image(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::io(
        path,
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{what}; the file may be truncated or not an image: re-export it or remove it"),
        ),
    )
}

/// A reader of the image file, opened inside `roots`; the format comes from the content, else
/// from the extension (as `ImageReader::open` does).
fn reader(
    path: &Path,
    roots: &AllowedRoots,
) -> Result<ImageReader<std::io::BufReader<std::fs::File>>> {
    let file = roots.open(path)?;
    let mut reader = ImageReader::new(std::io::BufReader::new(file));
    if let Ok(format) = image::ImageFormat::from_path(path) {
        reader.set_format(format);
    }
    reader.with_guessed_format().map_err(|e| Error::io(path, e))
}

/// Width and height from the file header, without decoding the pixels.
pub fn probe_size(path: &Path, roots: &AllowedRoots) -> Result<(u32, u32)> {
    let reader = reader(path, roots)?;
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| bad_image(path, format!("cannot read the image header: {e}")))?;
    if w == 0 || h == 0 {
        return Err(bad_image(path, format!("the image is {w}x{h}")));
    }
    Ok((w, h))
}

/// Decodes an image file to 8-bit RGB.
pub fn decode_rgb(path: &Path, roots: &AllowedRoots) -> Result<RgbImage> {
    let reader = reader(path, roots)?;
    let img = reader
        .decode()
        .map_err(|e| bad_image(path, format!("cannot decode the image: {e}")))?;
    Ok(img.into_rgb8())
}

/// kohya's `resize_image` with its default interpolation: area averaging when no side grows,
/// Lanczos otherwise.
pub fn resize_like_kohya(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    if img.width() == width && img.height() == height {
        img.clone()
    } else if img.width() >= width && img.height() >= height {
        area_resize(img, width, height)
    } else {
        lanczos_resize(img, width, height)
    }
}

/// Resizes to the bucket's cover size, crops to the bucket (kohya's
/// `trim_and_resize_if_required`) and flips horizontally when asked.
pub fn fit_to_bucket<R: Rng + ?Sized>(
    path: &Path,
    img: &RgbImage,
    choice: &BucketChoice,
    crop: CropMode,
    flip: bool,
    rng: &mut R,
) -> Result<RgbImage> {
    let (rw, rh) = choice.resized;
    let (bw, bh) = choice.reso;
    if rw < bw || rh < bh {
        return Err(bad_image(
            path,
            format!("resized to {rw}x{rh}, smaller than its bucket {bw}x{bh}"),
        ));
    }
    let resized = resize_like_kohya(img, rw, rh);
    let mut offset = |len: u32, target: u32| {
        let trim = len - target;
        match crop {
            CropMode::Random if trim > 0 => rng.random_range(0..=trim),
            _ => trim / 2,
        }
    };
    // kohya draws the horizontal offset first.
    let x = offset(rw, bw);
    let y = offset(rh, bh);
    let mut out = image::imageops::crop_imm(&resized, x, y, bw, bh).to_image();
    if flip {
        image::imageops::flip_horizontal_in_place(&mut out);
    }
    Ok(out)
}

/// 8-bit RGB to an f32 `[3, H, W]` tensor in [-1, 1] (torchvision's `ToTensor` then
/// `Normalize(0.5, 0.5)`, in the same f32 operations).
pub fn to_tensor(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut data = vec![0f32; 3 * h * w];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            data[c * h * w + i] = (px.0[c] as f32 / 255.0 - 0.5) / 0.5;
        }
    }
    Ok(Tensor::from_vec(data, (3, h, w), device)?)
}

/// Pixel-area averaging (OpenCV `INTER_AREA` for reductions): each output pixel is the mean of
/// the source area it covers, partial pixels weighted by their covered fraction.
pub fn area_resize(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (iw, ih) = (img.width() as usize, img.height() as usize);
    let (ow, oh) = (width as usize, height as usize);
    if ow == 0 || oh == 0 {
        return RgbImage::new(width, height);
    }
    if iw.is_multiple_of(ow) && ih.is_multiple_of(oh) {
        return area_resize_integer(img, iw / ow, ih / oh, width, height);
    }
    let xw = area_weights(iw, ow);
    let yw = area_weights(ih, oh);
    let src = img.as_raw();
    // Horizontal pass in f64, no rounding between passes (OpenCV accumulates in float).
    let mut tmp = vec![0f64; ih * ow * 3];
    for y in 0..ih {
        for (ox, taps) in xw.iter().enumerate() {
            for c in 0..3 {
                tmp[(y * ow + ox) * 3 + c] = taps
                    .iter()
                    .map(|&(x, wt)| src[(y * iw + x) * 3 + c] as f64 * wt)
                    .sum();
            }
        }
    }
    let mut out = vec![0u8; oh * ow * 3];
    for (oy, taps) in yw.iter().enumerate() {
        for ox in 0..ow {
            for c in 0..3 {
                let v: f64 = taps
                    .iter()
                    .map(|&(y, wt)| tmp[(y * ow + ox) * 3 + c] * wt)
                    .sum();
                out[(oy * ow + ox) * 3 + c] = v.round_ties_even().clamp(0.0, 255.0) as u8;
            }
        }
    }
    RgbImage::from_raw(width, height, out).unwrap_or_else(|| RgbImage::new(width, height))
}

/// OpenCV's integer-ratio `INTER_AREA` (`resizeAreaFast`): integer block sums, scaled by the f32
/// reciprocal of the block area and rounded half to even; the 2×2 case rounds halves up.
fn area_resize_integer(img: &RgbImage, sx: usize, sy: usize, width: u32, height: u32) -> RgbImage {
    let iw = img.width() as usize;
    let (ow, oh) = (width as usize, height as usize);
    let src = img.as_raw();
    let area = (sx * sy) as u32;
    let inv = 1.0f32 / area as f32;
    let mut out = vec![0u8; oh * ow * 3];
    for oy in 0..oh {
        for ox in 0..ow {
            for c in 0..3 {
                let mut sum = 0u32;
                for y in oy * sy..(oy + 1) * sy {
                    for x in ox * sx..(ox + 1) * sx {
                        sum += src[(y * iw + x) * 3 + c] as u32;
                    }
                }
                let v = if sx == 2 && sy == 2 {
                    (sum + 2) >> 2
                } else {
                    (sum as f32 * inv).round_ties_even() as u32
                };
                out[(oy * ow + ox) * 3 + c] = v.min(255) as u8;
            }
        }
    }
    RgbImage::from_raw(width, height, out).unwrap_or_else(|| RgbImage::new(width, height))
}

/// For each output index, the source indices and weights of the area it covers.
fn area_weights(in_len: usize, out_len: usize) -> Vec<Vec<(usize, f64)>> {
    let scale = in_len as f64 / out_len as f64;
    (0..out_len)
        .map(|o| {
            let start = o as f64 * scale;
            let end = ((o + 1) as f64 * scale).min(in_len as f64);
            let mut taps = Vec::new();
            let mut i = start.floor() as usize;
            while (i as f64) < end && i < in_len {
                let lo = start.max(i as f64);
                let hi = end.min((i + 1) as f64);
                if hi > lo {
                    taps.push((i, (hi - lo) / scale));
                }
                i += 1;
            }
            taps
        })
        .collect()
}

// Pillow's 8-bit resampler keeps coefficients in fixed point with this many fraction bits.
const PIL_PRECISION_BITS: u32 = 32 - 8 - 2;

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn lanczos3(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`: per output index, the first source
/// index and the fixed-point weights.
fn pil_coeffs(in_len: usize, out_len: usize) -> Vec<(usize, Vec<i64>)> {
    let scale = in_len as f64 / out_len as f64;
    let filterscale = scale.max(1.0);
    let support = 3.0 * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_len)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C casts truncate toward zero; both bounds are then clamped to the image.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = (((center + support + 0.5) as i64).min(in_len as i64) as usize).max(xmin);
            let mut k: Vec<f64> = (xmin..xmax)
                .map(|x| lanczos3((x as f64 - center + 0.5) * ss))
                .collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                k.iter_mut().for_each(|v| *v /= ww);
            }
            let one = (1i64 << PIL_PRECISION_BITS) as f64;
            let fixed = k
                .iter()
                .map(|&v| {
                    if v < 0.0 {
                        (-0.5 + v * one) as i64
                    } else {
                        (0.5 + v * one) as i64
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn pil_clip8(acc: i64) -> u8 {
    (acc >> PIL_PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `Image.resize(size, Image.LANCZOS)` on an RGB image, bit for bit: two separable
/// passes, each rounded to 8 bits, skipping a pass whose size is unchanged. Pillow 13 runs the
/// vertical pass first when the width grows and the height shrinks (older Pillow always starts
/// horizontally); kohya scales both sides by one factor, so it never meets that mixed case.
pub fn lanczos_resize(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (iw, ih) = (img.width() as usize, img.height() as usize);
    let (ow, oh) = (width as usize, height as usize);
    let mut cur = img.as_raw().clone();
    let vertical_first = ow > iw && oh < ih;
    if vertical_first {
        cur = lanczos_pass(&cur, iw, ih, oh, Axis::Vertical);
        cur = lanczos_pass(&cur, iw, oh, ow, Axis::Horizontal);
    } else {
        if ow != iw {
            cur = lanczos_pass(&cur, iw, ih, ow, Axis::Horizontal);
        }
        if oh != ih {
            cur = lanczos_pass(&cur, ow, ih, oh, Axis::Vertical);
        }
    }
    RgbImage::from_raw(width, height, cur).unwrap_or_else(|| RgbImage::new(width, height))
}

#[derive(Clone, Copy, PartialEq)]
enum Axis {
    Horizontal,
    Vertical,
}

/// One Pillow 8-bit resampling pass over a `w`×`h` RGB buffer, resizing `axis` to `out_len`.
fn lanczos_pass(src: &[u8], w: usize, h: usize, out_len: usize, axis: Axis) -> Vec<u8> {
    let half = 1i64 << (PIL_PRECISION_BITS - 1);
    let (ow, oh) = match axis {
        Axis::Horizontal => (out_len, h),
        Axis::Vertical => (w, out_len),
    };
    let in_len = if axis == Axis::Horizontal { w } else { h };
    let coeffs = pil_coeffs(in_len, out_len);
    let mut out = vec![0u8; ow * oh * 3];
    for y in 0..oh {
        for x in 0..ow {
            let (first, k) = match axis {
                Axis::Horizontal => &coeffs[x],
                Axis::Vertical => &coeffs[y],
            };
            for c in 0..3 {
                let mut acc = half;
                for (j, &kv) in k.iter().enumerate() {
                    let idx = match axis {
                        Axis::Horizontal => (y * w + first + j) * 3 + c,
                        Axis::Vertical => ((first + j) * w + x) * 3 + c,
                    };
                    acc += src[idx] as i64 * kv;
                }
                out[(y * ow + x) * 3 + c] = pil_clip8(acc);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_resize_averages_blocks() {
        let mut img = RgbImage::new(4, 2);
        for (i, px) in img.pixels_mut().enumerate() {
            *px = image::Rgb([(i * 10) as u8, 100, 200]);
        }
        let out = area_resize(&img, 2, 1);
        // Blocks (0,1,4,5) and (2,3,6,7) of 4×2 pixels: means 25 and 45.
        assert_eq!(out.get_pixel(0, 0).0, [25, 100, 200]);
        assert_eq!(out.get_pixel(1, 0).0, [45, 100, 200]);
        // Halves: to even for 2×1 blocks, up for 2×2 blocks (as OpenCV).
        let row = RgbImage::from_raw(2, 1, vec![1, 3, 5, 0, 0, 0]).unwrap();
        assert_eq!(area_resize(&row, 1, 1).get_pixel(0, 0).0, [0, 2, 2]);
        let mut sq = RgbImage::new(2, 2);
        sq.put_pixel(0, 0, image::Rgb([2, 10, 18]));
        assert_eq!(area_resize(&sq, 1, 1).get_pixel(0, 0).0, [1, 3, 5]);
    }

    #[test]
    fn tensor_range() {
        let mut img = RgbImage::new(1, 1);
        img.put_pixel(0, 0, image::Rgb([0, 255, 128]));
        let t = to_tensor(&img, &Device::Cpu).unwrap();
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v[0], -1.0);
        assert_eq!(v[1], 1.0);
        assert!((v[2] - 0.003_921_628).abs() < 1e-6);
    }
}
