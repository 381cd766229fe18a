// An IOVA and a physical address are different types: swapping them in
// `Iommu::enter` does not compile.
use kern::iommu::{DmaAccess, Iommu, Iova};
use kern::vm::Paddr;

fn map(iommu: &dyn Iommu, iova: Iova, pa: Paddr) {
    let _ = iommu.enter(pa, iova, 4096, DmaAccess::Read);
}

fn main() {}
