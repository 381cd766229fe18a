//! `strict`: a load allocates an IOVA range and maps the buffer; an unload
//! unmaps it (the host MMU invalidates, with shootdowns) and frees the
//! range. After unload the device can reach nothing. `lazy` maps the same
//! way ([`map`]) and differs only in its unload.

use super::{DmaDir, DmaError, DmaSeg, DmaTag, How, LoadError, Loaded, page_span, pages};
use crate::iommu::Iova;
use crate::vm::IoBuf;

/// Allocate an IOVA range for `buf` and map it.
pub(super) fn load(
    tag: &DmaTag,
    out: &mut Option<Loaded>,
    buf: IoBuf,
    dir: DmaDir,
) -> Result<(), LoadError> {
    let (_, _, mlen) = page_span(&buf);
    match tag.dom.iova.alloc(mlen) {
        Ok(iova) => map(tag, out, buf, dir, iova, mlen),
        Err(_) => {
            let len = buf.capacity();
            Err(LoadError {
                error: DmaError::NoSpace { len },
                buf,
            })
        }
    }
}

/// Map `buf` at `iova` (`len` bytes, page-aligned) into `out`, or free the
/// range and give the buffer back.
pub(super) fn map(
    tag: &DmaTag,
    out: &mut Option<Loaded>,
    buf: IoBuf,
    dir: DmaDir,
    iova: Iova,
    len: usize,
) -> Result<(), LoadError> {
    let (mpa, off, _) = page_span(&buf);
    if let Err(error) = tag.dom.enter(tag, iova, mpa, len, dir.access()) {
        tag.dom.iova.free(iova, len);
        return Err(LoadError { error, buf });
    }
    tag.dom.held(pages(len));
    tag.stats.held(pages(len));
    let seg = DmaSeg {
        iova: iova + off,
        len: buf.len(),
    };
    *out = Some(Loaded {
        buf,
        dir,
        seg,
        how: How::Mapped { iova, len },
    });
    Ok(())
}

/// Unmap at once, free the range, and tell the waiters.
pub(super) fn unload(tag: &DmaTag, iova: Iova, len: usize) {
    tag.dom.remove(tag, iova, len);
    tag.dom.held(-pages(len));
    tag.stats.held(-pages(len));
    tag.dom.iova.free(iova, len);
    tag.space_freed();
}
