//! Mapped device memory: the BAR (registers) and the DMA region (rings and data
//! buffers), behind one trait with three implementations:
//!
//! - [`FileMapping`]: a shared file mapping (a file under `/dev/shm` or hugetlbfs) laid
//!   out as `BAR | DMA`; the emulator and the driver map the same file.
//! - [`HeapMemory`]: process memory, for unit and model tests of the ring protocol.
//! - [`vfio::VfioMapping`]: a real card's BAR through VFIO plus IOMMU-mapped hugepage
//!   DMA memory (compiled, documented, not testable on this machine).
//!
//! All access goes through [`MemRegion`], whose methods check every offset and length
//! against the region and return [`OutOfBounds`] instead of touching memory outside it.
//! That is where "a hostile device cannot make the driver read or write outside the
//! regions" is enforced: no other code dereferences the mapping.
//!
//! Shared memory is never turned into Rust references to plain data (`&[u8]`), because
//! the peer may write it at any time: bytes are copied in and out with raw copies, and
//! the words both sides race on are accessed only as atomics.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

use super::regs::BAR_BYTES;

/// An offset or length outside a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("access of {len} bytes at {offset} outside a region of {region} bytes (or misaligned)")]
pub struct OutOfBounds {
    /// Requested offset.
    pub offset: usize,
    /// Requested length.
    pub len: usize,
    /// Region size.
    pub region: usize,
}

/// A bounds-checked window on mapped memory. Cheap to copy; it does not own the
/// mapping, so it is only handed out by a [`DeviceMemory`] and used while that memory
/// is alive (the driver and the firmware keep the `Arc` of the mapping next to it).
#[derive(Clone, Copy)]
pub struct MemRegion {
    base: NonNull<u8>,
    len: usize,
}

impl fmt::Debug for MemRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemRegion").field("len", &self.len).finish()
    }
}

// SAFETY: the region is plain memory shared with another party anyway; every access is
// a raw copy or an atomic, which is as valid from any thread as from the creating one.
unsafe impl Send for MemRegion {}
// SAFETY: as above; no method hands out a non-atomic reference into the region.
unsafe impl Sync for MemRegion {}

impl MemRegion {
    /// A region over `len` bytes at `base`.
    ///
    /// # Safety
    /// `base .. base + len` must be mapped, readable and writable, and 8-aligned, for as
    /// long as the region (or any copy of it) is used.
    pub unsafe fn new(base: NonNull<u8>, len: usize) -> Self {
        Self { base, len }
    }

    /// Bytes in the region.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: usize, len: usize, align: usize) -> Result<(), OutOfBounds> {
        let oob = OutOfBounds {
            offset,
            len,
            region: self.len,
        };
        let end = offset.checked_add(len).ok_or(oob)?;
        if end > self.len || offset % align != 0 {
            return Err(oob);
        }
        Ok(())
    }

    /// A sub-region `offset .. offset + len` (8-aligned).
    pub fn slice(&self, offset: usize, len: usize) -> Result<MemRegion, OutOfBounds> {
        self.check(offset, len, 8)?;
        // SAFETY: checked to lie inside this region, which is valid by construction.
        Ok(unsafe { MemRegion::new(self.base.add(offset), len) })
    }

    /// Copies `out.len()` bytes at `offset` into `out`.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), OutOfBounds> {
        self.check(offset, out.len(), 1)?;
        // SAFETY: source range checked inside the mapping; destination is a distinct
        // local buffer. A racing writer can only make the bytes wrong, which every
        // caller detects with a check or CRC.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.as_ptr().add(offset),
                out.as_mut_ptr(),
                out.len(),
            );
        }
        Ok(())
    }

    /// Copies `bytes` to `offset`.
    pub fn write(&self, offset: usize, bytes: &[u8]) -> Result<(), OutOfBounds> {
        self.check(offset, bytes.len(), 1)?;
        // SAFETY: destination range checked inside the mapping; source is local.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.base.as_ptr().add(offset),
                bytes.len(),
            );
        }
        Ok(())
    }

    /// Zeroes `len` bytes at `offset`.
    pub fn zero(&self, offset: usize, len: usize) -> Result<(), OutOfBounds> {
        self.check(offset, len, 1)?;
        // SAFETY: range checked inside the mapping.
        unsafe { std::ptr::write_bytes(self.base.as_ptr().add(offset), 0, len) };
        Ok(())
    }

    /// The 4-aligned u32 at `offset` as an atomic.
    pub fn u32_at(&self, offset: usize) -> Result<&AtomicU32, OutOfBounds> {
        self.check(offset, 4, 4)?;
        // SAFETY: in range and aligned; atomics may alias memory another process writes
        // (that is what they are for), and the mapping outlives `&self`'s use.
        Ok(unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(offset).cast()) })
    }

    /// The 8-aligned u64 at `offset` as an atomic.
    pub fn u64_at(&self, offset: usize) -> Result<&AtomicU64, OutOfBounds> {
        self.check(offset, 8, 8)?;
        // SAFETY: as for `u32_at`.
        Ok(unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(offset).cast()) })
    }
}

/// Mapped device memory: a register block and a DMA region.
pub trait DeviceMemory: Send + Sync + fmt::Debug {
    /// The register block (BAR 0), at least [`BAR_BYTES`].
    fn bar(&self) -> MemRegion;
    /// The DMA region: rings and data buffers.
    fn dma(&self) -> MemRegion;
}

/// A shared file mapping laid out as `BAR (4 KiB) | DMA`, standing in for a card's BAR
/// and the host memory it DMAs to. Used by the emulator (which creates and sizes the
/// file) and by the driver (which maps what is there).
pub struct FileMapping {
    base: NonNull<u8>,
    len: usize,
    path: PathBuf,
    file: File,
}

// SAFETY: the mapping is process-wide memory; access goes through `MemRegion`.
unsafe impl Send for FileMapping {}
// SAFETY: as above.
unsafe impl Sync for FileMapping {}

impl fmt::Debug for FileMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileMapping")
            .field("path", &self.path)
            .field("len", &self.len)
            .finish()
    }
}

impl FileMapping {
    /// Driver side: maps the whole existing file read-write, shared.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "region too large"))?;
        if len < BAR_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is {len} bytes, smaller than a BAR", path.display()),
            ));
        }
        Self::map(file, len, path)
    }

    /// Device side: opens or creates the file (mode 0600) and grows it to `len` bytes.
    /// Never shrinks it: a driver still mapping the old size would fault (SIGBUS) on
    /// the pages cut off.
    pub fn create(path: &Path, len: usize) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        let current = file.metadata()?.len();
        if current < len as u64 {
            file.set_len(len as u64)?;
        }
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "region too large"))?;
        Self::map(file, len, path)
    }

    fn map(file: File, len: usize, path: &Path) -> io::Result<Self> {
        // SAFETY: mapping a file we opened read-write; the kernel picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self {
            base,
            len,
            path: path.to_path_buf(),
            file,
        })
    }

    /// The mapped file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file (the emulator `flock`s it).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is mapped (never: a mapping has at least a BAR).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl DeviceMemory for FileMapping {
    fn bar(&self) -> MemRegion {
        // SAFETY: `open`/`create` guarantee len >= BAR_BYTES; mmap is page-aligned; the
        // mapping lives as long as self.
        unsafe { MemRegion::new(self.base, BAR_BYTES.min(self.len)) }
    }

    fn dma(&self) -> MemRegion {
        let len = self.len.saturating_sub(BAR_BYTES);
        // SAFETY: as above; BAR_BYTES keeps page (and so 8-byte) alignment.
        unsafe { MemRegion::new(self.base.add(BAR_BYTES.min(self.len)), len) }
    }
}

impl Drop for FileMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped; no region outlives the owner's
        // users (they hold an Arc of this mapping).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// Device memory in this process's heap, for tests and models of the ring protocol.
pub struct HeapMemory {
    bar: Box<[u64]>,
    dma: Box<[u64]>,
}

impl fmt::Debug for HeapMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeapMemory")
            .field("dma_bytes", &(self.dma.len() * 8))
            .finish()
    }
}

impl HeapMemory {
    /// A zeroed BAR and `dma_bytes` (rounded up to 8) of zeroed DMA memory.
    pub fn new(dma_bytes: usize) -> Self {
        Self {
            bar: vec![0u64; BAR_BYTES / 8].into_boxed_slice(),
            dma: vec![0u64; dma_bytes.div_ceil(8)].into_boxed_slice(),
        }
    }
}

impl DeviceMemory for HeapMemory {
    fn bar(&self) -> MemRegion {
        let base = NonNull::new(self.bar.as_ptr() as *mut u8).unwrap_or(NonNull::dangling());
        // SAFETY: the boxed slice is 8-aligned, lives as long as self, and is only
        // accessed through raw copies and atomics (interior mutability by design).
        unsafe { MemRegion::new(base, self.bar.len() * 8) }
    }

    fn dma(&self) -> MemRegion {
        let base = NonNull::new(self.dma.as_ptr() as *mut u8).unwrap_or(NonNull::dangling());
        // SAFETY: as for `bar`.
        unsafe { MemRegion::new(base, self.dma.len() * 8) }
    }
}

/// A real card through VFIO (Linux's user-space device framework, as SPDK and DPDK use
/// it). Compiled so the shape is kept honest; this machine has no such card, so it is
/// not tested. docs/hsm-pcie.md ("VFIO") describes how it would be set up.
pub mod vfio {
    use super::*;

    // ioctl numbers of linux/vfio.h: _IO(';', 100 + n).
    const VFIO_TYPE: u64 = b';' as u64;
    const fn vfio_io(nr: u64) -> u64 {
        (VFIO_TYPE << 8) | (100 + nr)
    }
    const VFIO_GET_API_VERSION: u64 = vfio_io(0);
    const VFIO_CHECK_EXTENSION: u64 = vfio_io(1);
    const VFIO_SET_IOMMU: u64 = vfio_io(2);
    const VFIO_GROUP_GET_STATUS: u64 = vfio_io(3);
    const VFIO_GROUP_SET_CONTAINER: u64 = vfio_io(4);
    const VFIO_GROUP_GET_DEVICE_FD: u64 = vfio_io(6);
    const VFIO_DEVICE_GET_REGION_INFO: u64 = vfio_io(8);
    const VFIO_IOMMU_MAP_DMA: u64 = vfio_io(13);
    const VFIO_API_VERSION: libc::c_int = 0;
    const VFIO_TYPE1_IOMMU: libc::c_ulong = 1;
    const VFIO_GROUP_FLAGS_VIABLE: u32 = 1;
    const VFIO_DMA_MAP_FLAG_READ: u32 = 1;
    const VFIO_DMA_MAP_FLAG_WRITE: u32 = 2;

    #[repr(C)]
    struct GroupStatus {
        argsz: u32,
        flags: u32,
    }

    #[repr(C)]
    struct RegionInfo {
        argsz: u32,
        flags: u32,
        index: u32,
        cap_offset: u32,
        size: u64,
        offset: u64,
    }

    #[repr(C)]
    struct DmaMap {
        argsz: u32,
        flags: u32,
        vaddr: u64,
        iova: u64,
        size: u64,
    }

    fn ioctl<T>(fd: libc::c_int, request: u64, arg: *mut T) -> io::Result<libc::c_int> {
        // SAFETY: the caller passes a request number whose argument type is T.
        let rc = unsafe { libc::ioctl(fd, request as _, arg) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    fn ioctl_val(fd: libc::c_int, request: u64, arg: libc::c_ulong) -> io::Result<libc::c_int> {
        // SAFETY: requests taking a value argument (or none).
        let rc = unsafe { libc::ioctl(fd, request as _, arg) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    /// BAR 0 of a VFIO device plus `dma_bytes` of hugepage memory mapped for the device
    /// at IOVA 0, so that DMA offsets in the queue registers are IOVAs.
    pub struct VfioMapping {
        _container: File,
        _group: File,
        _device: File,
        bar: NonNull<u8>,
        bar_len: usize,
        dma: NonNull<u8>,
        dma_len: usize,
    }

    // SAFETY: as for FileMapping.
    unsafe impl Send for VfioMapping {}
    // SAFETY: as for FileMapping.
    unsafe impl Sync for VfioMapping {}

    impl fmt::Debug for VfioMapping {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("VfioMapping")
                .field("bar_len", &self.bar_len)
                .field("dma_len", &self.dma_len)
                .finish()
        }
    }

    impl VfioMapping {
        /// Opens `/dev/vfio/<group>`, attaches it to a new type-1 container, gets the
        /// device `pci_address` (e.g. `0000:3b:00.0`), maps its BAR 0, allocates
        /// `dma_bytes` of 2 MiB hugepages and maps them for the device at IOVA 0.
        /// The driver must then write `REG_DMA_BYTES` so the card lays out its queues
        /// in that memory (docs/hsm-pcie.md).
        pub fn open(group: u32, pci_address: &str, dma_bytes: usize) -> io::Result<Self> {
            let rw = |p: &str| OpenOptions::new().read(true).write(true).open(p);
            let container = rw("/dev/vfio/vfio")?;
            let cfd = container.as_raw_fd();
            if ioctl_val(cfd, VFIO_GET_API_VERSION, 0)? != VFIO_API_VERSION {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "VFIO API version",
                ));
            }
            if ioctl_val(cfd, VFIO_CHECK_EXTENSION, VFIO_TYPE1_IOMMU)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "no type-1 IOMMU",
                ));
            }
            let group_file = rw(&format!("/dev/vfio/{group}"))?;
            let gfd = group_file.as_raw_fd();
            let mut status = GroupStatus {
                argsz: std::mem::size_of::<GroupStatus>() as u32,
                flags: 0,
            };
            ioctl(gfd, VFIO_GROUP_GET_STATUS, &mut status)?;
            if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "VFIO group not viable (bind every device of the group to vfio-pci)",
                ));
            }
            let mut c = cfd;
            ioctl(gfd, VFIO_GROUP_SET_CONTAINER, &mut c)?;
            ioctl_val(cfd, VFIO_SET_IOMMU, VFIO_TYPE1_IOMMU)?;
            let name = std::ffi::CString::new(pci_address)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pci address"))?;
            // SAFETY: GET_DEVICE_FD takes a NUL-terminated device name.
            let dfd = unsafe { libc::ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD as _, name.as_ptr()) };
            if dfd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a fresh descriptor owned from here on.
            let device = unsafe { <File as std::os::unix::io::FromRawFd>::from_raw_fd(dfd) };
            let mut info = RegionInfo {
                argsz: std::mem::size_of::<RegionInfo>() as u32,
                flags: 0,
                index: 0, // VFIO_PCI_BAR0_REGION_INDEX
                cap_offset: 0,
                size: 0,
                offset: 0,
            };
            ioctl(dfd, VFIO_DEVICE_GET_REGION_INFO, &mut info)?;
            let bar_len = usize::try_from(info.size)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "BAR size"))?;
            if bar_len < BAR_BYTES {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "BAR 0 too small",
                ));
            }
            // SAFETY: mapping the device's BAR region at the offset VFIO reported.
            let bar = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    bar_len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    dfd,
                    info.offset as libc::off_t,
                )
            };
            if bar == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: anonymous hugepage memory for DMA.
            let dma = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    dma_bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
                    -1,
                    0,
                )
            };
            if dma == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let mut map = DmaMap {
                argsz: std::mem::size_of::<DmaMap>() as u32,
                flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
                vaddr: dma as u64,
                iova: 0,
                size: dma_bytes as u64,
            };
            ioctl(cfd, VFIO_IOMMU_MAP_DMA, &mut map)?;
            Ok(Self {
                _container: container,
                _group: group_file,
                _device: device,
                bar: NonNull::new(bar.cast()).unwrap_or(NonNull::dangling()),
                bar_len,
                dma: NonNull::new(dma.cast()).unwrap_or(NonNull::dangling()),
                dma_len: dma_bytes,
            })
        }
    }

    impl DeviceMemory for VfioMapping {
        fn bar(&self) -> MemRegion {
            // SAFETY: mapped in `open` for the life of self.
            unsafe { MemRegion::new(self.bar, self.bar_len) }
        }
        fn dma(&self) -> MemRegion {
            // SAFETY: mapped in `open` for the life of self.
            unsafe { MemRegion::new(self.dma, self.dma_len) }
        }
    }

    impl Drop for VfioMapping {
        fn drop(&mut self) {
            // SAFETY: unmapping what `open` mapped. (The IOMMU mapping goes with the
            // container.)
            unsafe {
                libc::munmap(self.bar.as_ptr().cast(), self.bar_len);
                libc::munmap(self.dma.as_ptr().cast(), self.dma_len);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn region_checks_every_access() {
        let m = HeapMemory::new(64);
        let d = m.dma();
        assert_eq!(d.len(), 64);
        let mut buf = [0u8; 8];
        assert!(d.write(56, &[1; 8]).is_ok());
        assert!(d.write(57, &[1; 8]).is_err());
        assert!(d.read(usize::MAX - 2, &mut buf).is_err());
        assert!(d.u32_at(2).is_err(), "misaligned");
        assert!(d.u64_at(64).is_err());
        d.u64_at(8).expect("in range").store(7, Ordering::Release);
        d.read(8, &mut buf).expect("read");
        assert_eq!(u64::from_le_bytes(buf), 7);
        assert!(d.slice(8, 57).is_err());
        let s = d.slice(8, 16).expect("slice");
        assert!(s.read(9, &mut buf).is_err());
    }

    #[test]
    fn file_mapping_is_shared_between_mappings() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("region");
        let a = FileMapping::create(&path, BAR_BYTES + 8192).expect("create");
        let b = FileMapping::open(&path).expect("open");
        a.dma()
            .u32_at(4096)
            .expect("in range")
            .store(0xFEED, Ordering::Release);
        assert_eq!(
            b.dma()
                .u32_at(4096)
                .expect("in range")
                .load(Ordering::Acquire),
            0xFEED
        );
        // Never shrinks.
        let c = FileMapping::create(&path, BAR_BYTES).expect("reopen");
        assert_eq!(c.len(), BAR_BYTES + 8192);
        std::fs::write(dir.path().join("tiny"), b"x").expect("write");
        assert!(FileMapping::open(&dir.path().join("tiny")).is_err());
    }
}
