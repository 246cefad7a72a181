/* The tensor-parallel data path: a full mesh of TCP connections between the machines of a
 * tensor-parallel group, and the exchanges the layer loop makes over it, in C.
 *
 * A decode step exchanges a few KB four times per layer; gRPC from Python costs 0.3-1 ms a
 * message, which would eat the whole gain. Here an exchange is one frame to and from every
 * other machine over sockets opened once per plan (TCP_NODELAY, set by the caller), written
 * and read by one poll loop with the GIL released: its cost is the link's.
 *
 * Every frame is sealed with AES-256-GCM from the system's libcrypto (loaded with dlopen: no
 * headers needed to build; no cryptography of our own). Each direction of each link has its
 * own key, derived on both ends from a per-plan key that the host sent over the mutually
 * authenticated TLS control channel (cluster/datapath.py). The nonce is the frame's sequence
 * number on that direction, which both ends count: a replayed, reordered, forged or garbled
 * frame fails its tag and the exchange fails with an error that names the peer.
 *
 * Frame: [u32 payload bytes][u32 sequence, low bits] (authenticated, not secret) [payload,
 * encrypted][16-byte tag]. The receiver always knows how many bytes to expect: a frame of any
 * other size is refused before a byte of it is read into memory.
 */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define FS_MESH_MAX 64
#define HEADER 8
#define TAG 16

/* ---- libcrypto, looked up once ------------------------------------------------------------ */
typedef struct evp_ctx evp_ctx;
static struct {
    int ok;
    evp_ctx *(*ctx_new)(void);
    void (*ctx_free)(evp_ctx *);
    const void *(*gcm)(void);
    int (*enc_init)(evp_ctx *, const void *, void *, const unsigned char *, const unsigned char *);
    int (*enc_update)(evp_ctx *, unsigned char *, int *, const unsigned char *, int);
    int (*enc_final)(evp_ctx *, unsigned char *, int *);
    int (*dec_init)(evp_ctx *, const void *, void *, const unsigned char *, const unsigned char *);
    int (*dec_update)(evp_ctx *, unsigned char *, int *, const unsigned char *, int);
    int (*dec_final)(evp_ctx *, unsigned char *, int *);
    int (*ctrl)(evp_ctx *, int, int, void *);
} evp;

#define EVP_CTRL_GCM_GET_TAG 0x10
#define EVP_CTRL_GCM_SET_TAG 0x11

static void find_crypto(void) {
    const char *names[] = { "libcrypto.so.3", "libcrypto.so", "libcrypto.so.1.1" };
    void *lib = NULL;
    for (int i = 0; i < 3 && !lib; i++) lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    if (!lib) return;
#define SYM(field, name) if (!(*(void **)&evp.field = dlsym(lib, name))) return
    SYM(ctx_new, "EVP_CIPHER_CTX_new"); SYM(ctx_free, "EVP_CIPHER_CTX_free"); SYM(gcm, "EVP_aes_256_gcm");
    SYM(enc_init, "EVP_EncryptInit_ex"); SYM(enc_update, "EVP_EncryptUpdate"); SYM(enc_final, "EVP_EncryptFinal_ex");
    SYM(dec_init, "EVP_DecryptInit_ex"); SYM(dec_update, "EVP_DecryptUpdate"); SYM(dec_final, "EVP_DecryptFinal_ex");
    SYM(ctrl, "EVP_CIPHER_CTX_ctrl");
#undef SYM
    evp.ok = 1;
}

/* Once per process, whichever thread asks first (the machines of an in-process group open
 * their meshes at the same time: a plain flag let the second see "tried, not loaded"). */
static pthread_once_t crypto_once = PTHREAD_ONCE_INIT;

static int load_crypto(void) {
    pthread_once(&crypto_once, find_crypto);
    return evp.ok;
}

int fs_mesh_crypto_available(void) { return load_crypto(); }

/* ---- the mesh ------------------------------------------------------------------------------- */
typedef struct {
    evp_ctx *ctx;       /* NULL: this link is plaintext (measurements only, never the default) */
    uint64_t seq;
} fs_dir;

typedef struct fs_mesh {
    int n, rank;
    int fd[FS_MESH_MAX];
    fs_dir tx[FS_MESH_MAX], rx[FS_MESH_MAX];
    uint8_t *txbuf[FS_MESH_MAX], *rxbuf[FS_MESH_MAX];
    long txcap[FS_MESH_MAX], rxcap[FS_MESH_MAX];
    long exchanges, bytes_out;   /* counters for the benchmark */
    double ms_in_exchanges;
    int failed_peer;             /* the peer of the last failure, or -1 */
    char error[256];
} fs_mesh;

const char *fs_mesh_error(const fs_mesh *m) { return m->error; }
int fs_mesh_failed_peer(const fs_mesh *m) { return m->failed_peer; }
long fs_mesh_exchanges(const fs_mesh *m) { return m->exchanges; }
long fs_mesh_bytes_out(const fs_mesh *m) { return m->bytes_out; }
double fs_mesh_ms(const fs_mesh *m) { return m->ms_in_exchanges; }

static int fail(fs_mesh *m, int peer, int code, const char *what) {
    m->failed_peer = peer;
    snprintf(m->error, sizeof m->error, "%s (machine %d of the group)", what, peer);
    return code;
}

void fs_mesh_free(fs_mesh *m) {
    if (!m) return;
    for (int p = 0; p < m->n; p++) {
        if (m->tx[p].ctx) evp.ctx_free(m->tx[p].ctx);
        if (m->rx[p].ctx) evp.ctx_free(m->rx[p].ctx);
        free(m->txbuf[p]);
        free(m->rxbuf[p]);
    }
    free(m);
}

/* n machines, this one `rank`; fds[p]: a connected TCP socket to machine p (-1 for itself; the
 * caller keeps owning them). keys: 2 n 32 bytes, [p][0] the key of frames to p, [p][1] of frames
 * from p; NULL for plaintext. Returns NULL when the sizes are wrong or libcrypto is missing. */
fs_mesh *fs_mesh_new(int n, int rank, const int *fds, const uint8_t *keys) {
    if (n < 1 || n > FS_MESH_MAX || rank < 0 || rank >= n) return NULL;
    if (keys && !load_crypto()) return NULL;
    fs_mesh *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    m->n = n, m->rank = rank, m->failed_peer = -1;
    for (int p = 0; p < n; p++) {
        m->fd[p] = p == rank ? -1 : fds[p];
        if (p == rank) continue;
        if (m->fd[p] < 0) { fs_mesh_free(m); return NULL; }
        int flags = fcntl(m->fd[p], F_GETFL, 0);
        fcntl(m->fd[p], F_SETFL, flags | O_NONBLOCK);
        if (keys) {
            const uint8_t *k_out = keys + (size_t)p * 64, *k_in = k_out + 32;
            m->tx[p].ctx = evp.ctx_new();
            m->rx[p].ctx = evp.ctx_new();
            if (!m->tx[p].ctx || !m->rx[p].ctx || evp.enc_init(m->tx[p].ctx, evp.gcm(), NULL, k_out, NULL) != 1
                || evp.dec_init(m->rx[p].ctx, evp.gcm(), NULL, k_in, NULL) != 1) { fs_mesh_free(m); return NULL; }
        }
    }
    return m;
}

static int grow(uint8_t **buf, long *cap, long need) {
    if (*cap >= need) return 0;
    uint8_t *b = realloc(*buf, (size_t)need);
    if (!b) return -1;
    *buf = b, *cap = need;
    return 0;
}

static void nonce_of(uint64_t seq, unsigned char iv[12]) {
    memset(iv, 0, 4);
    for (int i = 0; i < 8; i++) iv[4 + i] = (unsigned char)(seq >> (8 * i));
}

/* frame `len` bytes of `data` to peer p into m->txbuf[p] */
static int seal(fs_mesh *m, int p, const void *data, long len) {
    if (grow(&m->txbuf[p], &m->txcap[p], HEADER + len + TAG) != 0) return fail(m, p, -5, "out of memory for a frame");
    uint8_t *f = m->txbuf[p];
    const uint64_t seq = m->tx[p].seq++;
    const uint32_t head[2] = { (uint32_t)len, (uint32_t)seq };
    memcpy(f, head, HEADER);
    if (!m->tx[p].ctx) { if (len) memcpy(f + HEADER, data, (size_t)len); memset(f + HEADER + len, 0, TAG); return 0; }
    unsigned char iv[12];
    nonce_of(seq, iv);
    int out = 0;
    evp_ctx *c = m->tx[p].ctx;
    if (evp.enc_init(c, NULL, NULL, NULL, iv) != 1 || evp.enc_update(c, NULL, &out, f, HEADER) != 1
        || (len && evp.enc_update(c, f + HEADER, &out, data, (int)len) != 1)
        || evp.enc_final(c, f + HEADER + len, &out) != 1 || evp.ctrl(c, EVP_CTRL_GCM_GET_TAG, TAG, f + HEADER + len) != 1)
        return fail(m, p, -5, "libcrypto could not seal a frame");
    return 0;
}

/* check and open the frame from peer p in m->rxbuf[p] into `out` (len bytes) */
static int open_frame(fs_mesh *m, int p, void *out, long len) {
    const uint8_t *f = m->rxbuf[p];
    const uint64_t seq = m->rx[p].seq++;
    uint32_t head[2];
    memcpy(head, f, HEADER);
    if (head[1] != (uint32_t)seq) return fail(m, p, -2, "a frame out of sequence (replayed, lost or forged)");
    if (!m->rx[p].ctx) { if (len) memcpy(out, f + HEADER, (size_t)len); return 0; }
    unsigned char iv[12], tag[TAG];
    nonce_of(seq, iv);
    memcpy(tag, f + HEADER + len, TAG);
    int n = 0;
    evp_ctx *c = m->rx[p].ctx;
    if (evp.dec_init(c, NULL, NULL, NULL, iv) != 1 || evp.dec_update(c, NULL, &n, f, HEADER) != 1
        || (len && evp.dec_update(c, out, &n, f + HEADER, (int)len) != 1)
        || evp.ctrl(c, EVP_CTRL_GCM_SET_TAG, TAG, tag) != 1 || evp.dec_final(c, (unsigned char *)out + len, &n) != 1)
        return fail(m, p, -2, "a frame failed its authentication tag (garbled, or not from the group)");
    return 0;
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

/* One exchange: to every peer p with send_len[p] >= 0 a frame of out[p] (send_len[p] bytes),
 * from every peer p with recv_len[p] >= 0 a frame of exactly that many bytes into in[p]; all
 * at once, so that two machines sending each other large frames never wait on each other.
 * timeout_ms < 0: wait as long as it takes. Returns 0, or < 0 with fs_mesh_error set:
 * -1 a peer closed its connection or the socket failed, -2 a frame failed its checks,
 * -3 no progress within the timeout, -4 a frame of a size other than expected, -5 local. */
int fs_mesh_exchange(fs_mesh *m, const void *const *out, const long *send_len, void *const *in,
                     const long *recv_len, int timeout_ms) {
    long txoff[FS_MESH_MAX], txend[FS_MESH_MAX], rxoff[FS_MESH_MAX], rxend[FS_MESH_MAX];
    int pending = 0;
    m->failed_peer = -1;
    m->error[0] = 0;
    for (int p = 0; p < m->n; p++) {
        txend[p] = rxend[p] = txoff[p] = rxoff[p] = 0;
        if (p == m->rank) continue;
        if (send_len[p] >= 0) {
            if (send_len[p] > (1L << 30)) return fail(m, p, -5, "a frame over 1 GiB");
            int rc = seal(m, p, out[p], send_len[p]);
            if (rc) return rc;
            txend[p] = HEADER + send_len[p] + TAG;
            pending++;
        }
        if (recv_len[p] >= 0) {
            if (recv_len[p] > (1L << 30) || grow(&m->rxbuf[p], &m->rxcap[p], HEADER + recv_len[p] + TAG) != 0)
                return fail(m, p, -5, "no room for a frame");
            rxend[p] = HEADER + recv_len[p] + TAG;
            pending++;
        }
    }
    const double started = now_ms();
    double deadline = timeout_ms >= 0 ? started + timeout_ms : 0;
    int idle = 0;
    while (pending > 0) {
        int moved = 0;
        for (int p = 0; p < m->n; p++) {
            if (txoff[p] < txend[p]) {
                ssize_t k = send(m->fd[p], m->txbuf[p] + txoff[p], (size_t)(txend[p] - txoff[p]), MSG_NOSIGNAL);
                if (k > 0) {
                    txoff[p] += k, moved = 1, m->bytes_out += k;
                    if (txoff[p] == txend[p]) pending--;
                } else if (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                    return fail(m, p, -1, "the connection to a machine failed while sending");
            }
            if (rxoff[p] < rxend[p]) {
                ssize_t k = recv(m->fd[p], m->rxbuf[p] + rxoff[p], (size_t)(rxend[p] - rxoff[p]), 0);
                if (k == 0) return fail(m, p, -1, "a machine closed its connection mid-exchange");
                if (k < 0) {
                    if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                        return fail(m, p, -1, "the connection to a machine failed while receiving");
                    continue;
                }
                const long before = rxoff[p];
                rxoff[p] += k, moved = 1;
                if (before < HEADER && rxoff[p] >= HEADER) {
                    uint32_t len;
                    memcpy(&len, m->rxbuf[p], 4);
                    if ((long)len != recv_len[p]) {
                        char what[128];
                        snprintf(what, sizeof what, "a frame of %u bytes where %ld were expected", len, recv_len[p]);
                        return fail(m, p, -4, what);
                    }
                }
                if (rxoff[p] == rxend[p]) {
                    int rc = open_frame(m, p, in[p], recv_len[p]);
                    if (rc) return rc;
                    pending--;
                }
            }
        }
        if (moved) { idle = 0; continue; }
        if (++idle < 200) continue;  /* a few microseconds of spinning: the answer is usually on its way */
        struct pollfd fds[FS_MESH_MAX];
        int count = 0;
        for (int p = 0; p < m->n; p++) {
            short ev = (short)((txoff[p] < txend[p] ? POLLOUT : 0) | (rxoff[p] < rxend[p] ? POLLIN : 0));
            if (ev) fds[count].fd = m->fd[p], fds[count].events = ev, fds[count++].revents = 0;
        }
        int wait = 100;
        if (timeout_ms >= 0) {
            double left = deadline - now_ms();
            if (left <= 0) {
                for (int p = 0; p < m->n; p++)
                    if (rxoff[p] < rxend[p] || txoff[p] < txend[p])
                        return fail(m, p, -3, "a machine stopped answering mid-exchange");
                return fail(m, -1, -3, "the exchange timed out");
            }
            wait = left < 100 ? (int)left + 1 : 100;
        }
        if (poll(fds, (nfds_t)count, wait) < 0 && errno != EINTR) return fail(m, -1, -1, "poll failed");
        idle = 0;
    }
    m->exchanges++;
    m->ms_in_exchanges += now_ms() - started;
    return 0;
}

/* All-gather of row blocks: every machine holds its columns [at[r], at[r+1]) of M rows
 * (`mine`, [M][at[r+1]-at[r]] contiguous) and gets every row whole in `full` ([M][at[n]]).
 * scratch: M at[n] floats. */
int fs_mesh_allgather_rows(fs_mesh *m, const float *mine, float *full, int M, const int *at, float *scratch,
                           int timeout_ms) {
    const int n = m ? m->n : 1, me = m ? m->rank : 0;
    const long total = at[n];
    const void *outs[FS_MESH_MAX];
    void *ins[FS_MESH_MAX];
    long send_len[FS_MESH_MAX], recv_len[FS_MESH_MAX];
    if (n > 1) {
        for (int p = 0; p < n; p++) {
            const long w = at[p + 1] - at[p];
            outs[p] = mine, send_len[p] = p == me ? -1 : (long)M * (at[me + 1] - at[me]) * 4;
            ins[p] = scratch + (long)M * at[p], recv_len[p] = p == me ? -1 : (long)M * w * 4;
        }
        int rc = fs_mesh_exchange(m, outs, send_len, ins, recv_len, timeout_ms);
        if (rc) return rc;
    }
    for (int p = 0; p < n; p++) {
        const long w = at[p + 1] - at[p];
        const float *src = p == me ? mine : scratch + (long)M * at[p];
        for (int r = 0; r < M; r++) memcpy(full + (long)r * total + at[p], src + (long)r * w, (size_t)w * 4);
    }
    return 0;
}
