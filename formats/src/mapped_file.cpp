#include "qtool/formats/mapped_file.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <utility>

#include "qtool/formats/error.hpp"
#include "qtool/formats/json.hpp"

namespace qtool {
namespace {

// The mappings the SIGBUS handler may repair: a fixed table of lock-free atomics, so that the
// handler (async-signal context, any thread) reads it without locks or allocation.
struct GuardSlot {
  std::atomic<int> state{0};  // 0 free, 1 being set up or released, 2 active
  std::atomic<uintptr_t> begin{0};
  std::atomic<uintptr_t> end{0};
  std::atomic<uint64_t> fault{0};  // 1 + the offset of the first read past the end; 0: none
};
constexpr int kGuardSlots = 4096;
GuardSlot g_slots[kGuardSlots];
struct sigaction g_previous {};

void chain_previous(int sig, siginfo_t* info, void* context) {
  if (g_previous.sa_flags & SA_SIGINFO) {
    if (g_previous.sa_sigaction) {
      g_previous.sa_sigaction(sig, info, context);
      return;
    }
  } else if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN && g_previous.sa_handler) {
    g_previous.sa_handler(sig);
    return;
  }
  // Default action: restore it; returning re-executes the faulting access, which now kills us.
  ::signal(sig, SIG_DFL);
}

void on_sigbus(int sig, siginfo_t* info, void* context) {
  const auto addr = reinterpret_cast<uintptr_t>(info->si_addr);
  for (GuardSlot& s : g_slots) {
    if (s.state.load(std::memory_order_acquire) != 2) continue;
    const uintptr_t b = s.begin.load(std::memory_order_relaxed), e = s.end.load(std::memory_order_relaxed);
    if (addr < b || addr >= e) continue;
    const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
    void* at = reinterpret_cast<void*>(addr & ~(page - 1));
    // A page of zeros in place of the missing file page; the reader continues and check_intact()
    // reports the truncation before anything read is trusted.
    if (::mmap(at, page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED) break;
    uint64_t none = 0;
    s.fault.compare_exchange_strong(none, static_cast<uint64_t>(addr - b) + 1);
    return;
  }
  chain_previous(sig, info, context);
}

void install_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa {};
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGBUS, &sa, &g_previous);
  });
}

int guard_mapping(const uint8_t* data, uint64_t size) {
  install_handler();
  for (int i = 0; i < kGuardSlots; ++i) {
    int free_state = 0;
    if (!g_slots[i].state.compare_exchange_strong(free_state, 1)) continue;
    g_slots[i].begin.store(reinterpret_cast<uintptr_t>(data), std::memory_order_relaxed);
    g_slots[i].end.store(reinterpret_cast<uintptr_t>(data) + size, std::memory_order_relaxed);
    g_slots[i].fault.store(0, std::memory_order_relaxed);
    g_slots[i].state.store(2, std::memory_order_release);
    return i;
  }
  return -1;  // table full: the mapping works, unguarded
}

void unguard(int slot) {
  if (slot < 0) return;
  g_slots[slot].state.store(1, std::memory_order_release);
  g_slots[slot].begin.store(0, std::memory_order_relaxed);
  g_slots[slot].end.store(0, std::memory_order_relaxed);
  g_slots[slot].state.store(0, std::memory_order_release);
}

}  // namespace

MappedFile::MappedFile(const std::filesystem::path& path) : path_(path) {
  // Refuses FIFOs, devices and sockets without blocking on them (json.hpp).
  const int fd = open_regular_file(path);
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    fail(ErrorKind::Io, path.string(), ": cannot stat: ", std::strerror(err));
  }
  size_ = static_cast<uint64_t>(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      fail(ErrorKind::Io, path.string(), ": cannot map ", size_, " bytes: ", std::strerror(err));
    }
    data_ = static_cast<const uint8_t*>(p);
    guard_ = guard_mapping(data_, size_);
  }
  fd_ = fd;
}

void MappedFile::check_intact() const {
  if (!data_) return;
  const uint64_t fault = guard_ >= 0 ? g_slots[guard_].fault.load(std::memory_order_acquire) : 0;
  struct stat st {};
  const bool shrank = fd_ >= 0 && ::fstat(fd_, &st) == 0 && static_cast<uint64_t>(st.st_size) < size_;
  if (fault == 0 && !shrank) return;
  std::string what = fault ? str_cat("byte ", fault - 1, " was read past its end") : std::string();
  if (shrank)
    what = str_cat("it is ", st.st_size, " bytes now, ", size_, " when it was opened",
                   what.empty() ? "" : "; ", what);
  fail(ErrorKind::Io, path_.string(), ": truncated while being read (", what,
       "): is a download or another program still writing it?");
}

void MappedFile::release() noexcept {
  unguard(guard_);
  guard_ = -1;
  if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
  if (fd_ >= 0) ::close(fd_);
  data_ = nullptr;
  size_ = 0;
  fd_ = -1;
}

MappedFile::~MappedFile() { release(); }

MappedFile::MappedFile(MappedFile&& other) noexcept
    : path_(std::move(other.path_)),
      data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      fd_(std::exchange(other.fd_, -1)),
      guard_(std::exchange(other.guard_, -1)) {}

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  if (this != &other) {
    release();
    path_ = std::move(other.path_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    fd_ = std::exchange(other.fd_, -1);
    guard_ = std::exchange(other.guard_, -1);
  }
  return *this;
}

}  // namespace qtool
