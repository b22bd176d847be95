/* fuzz_steer.c - libFuzzer harness for fp_reuseport_steer: its return for any nsocks (0 for
 * 1..FP_STEER_MAX_SOCKS, else -EINVAL), and the socket the kernel then picks in a real
 * SO_REUSEPORT group on 127.0.0.1 for a datagram holding any inner packet, against fastpath.h's
 * formula computed here:
 *   x = src ^ dst (^ the port word at IHL*4 for TCP/UDP that are not fragments),
 *   h = x ^ (x >> 16), socket ((h * 0x9E3779B1 mod 2^32) >> 16) % nsocks,
 * and socket 0 for a datagram too short for one of the program's loads. */
#include "fuzz.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

static const uint32_t group_sizes[] = { 1, 2, 3, 4, 5, 8 };
#define NGROUPS (sizeof(group_sizes) / sizeof(group_sizes[0]))
static int groups[NGROUPS][8];
static uint16_t ports[NGROUPS];
static int sender = -1;
static uint8_t rbuf[70000];

/* A UDP socket with SO_REUSEPORT, bound to 127.0.0.1:port (port > 0), or not bound (0): a
 * reuseport socket bound to port 0 may be given the port of another group of ours and join it. */
static int reuseport_socket(uint16_t port)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
    CHECK(fd >= 0, "socket");
    CHECK(setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) == 0, "SO_REUSEPORT");
    if (!port)
        return fd;
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port),
                             .sin_addr.s_addr = htonl(0x7f000001u) };
    CHECK(bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0, "bind :%u: %s", port, strerror(errno));
    return fd;
}

/* A port no socket holds: the kernel's pick for a plain socket, which it then gives back. */
static uint16_t free_port(void)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000001u) };
    socklen_t l = sizeof(a);
    CHECK(fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0
              && getsockname(fd, (struct sockaddr *)&a, &l) == 0, "a free port");
    close(fd);
    return ntohs(a.sin_port);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    for (size_t g = 0; g < NGROUPS; g++) {
        ports[g] = free_port();
        for (uint32_t i = 0; i < group_sizes[g]; i++) /* bound in queue order */
            groups[g][i] = reuseport_socket(ports[g]);
        int rc = fp_reuseport_steer(groups[g][0], group_sizes[g]);
        CHECK(rc == 0, "fp_reuseport_steer(%u sockets) = %d", group_sizes[g], rc);
    }
    sender = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    return 0;
}

/* fastpath.h's formula, with classic BPF's rule that a load past the end returns 0. */
static uint32_t ref_steer(const uint8_t *p, uint32_t len, uint32_t nsocks)
{
    if (len < 20)
        return 0;
    uint32_t x = g32(p + 12) ^ g32(p + 16);
    if (p[9] == P_TCP || p[9] == P_UDP) {
        if (!(g16(p + 6) & 0x3fff)) {
            uint32_t ihl = (uint32_t)(p[0] & 15) * 4;
            if (ihl + 4 > len)
                return 0;
            x ^= g32(p + ihl);
        }
    }
    uint32_t h = x ^ (x >> 16);
    return ((h * 0x9E3779B1u) >> 16) % nsocks;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_in in = { data, size };
    /* the return value, on a socket of its own (not bound: it joins no group) */
    uint8_t ns = in_u8(&in);
    uint32_t nsocks = ns % 6 == 0 ? 0 : ns % 6 == 1 ? FP_STEER_MAX_SOCKS
                    : ns % 6 == 2 ? FP_STEER_MAX_SOCKS + 1 : ns % 6 == 3 ? in_u32(&in) : 1 + in_u8(&in);
    if (ns >= 0xc0) {
        int fd = reuseport_socket(0);
        int rc = fp_reuseport_steer(fd, nsocks);
        int ok = nsocks >= 1 && nsocks <= FP_STEER_MAX_SOCKS;
        CHECK(rc == (ok ? 0 : -EINVAL), "fp_reuseport_steer(nsocks %u) = %d", nsocks, rc);
        close(fd);
    }

    /* the socket a datagram lands on */
    size_t g = in_u8(&in) % NGROUPS;
    fz_geom geom = { .mtu = 1400, .slot_size = 1401, .proto = -1, .max_len = 1500 };
    fz_pkt p = fz_build_ip(&in, &geom);
    struct sockaddr_in to = { .sin_family = AF_INET, .sin_port = htons(ports[g]),
                              .sin_addr.s_addr = htonl(0x7f000001u) };
    CHECK(sendto(sender, p.buf, p.len, 0, (struct sockaddr *)&to, sizeof(to)) == (ssize_t)p.len,
          "sendto: %s", strerror(errno));
    uint32_t want = ref_steer(p.buf, p.len, group_sizes[g]);
    int at = -1;
    for (int t = 0; t < 1000 && at < 0; t++) {
        struct pollfd pf[8];
        for (uint32_t i = 0; i < group_sizes[g]; i++)
            pf[i] = (struct pollfd){ .fd = groups[g][i], .events = POLLIN };
        poll(pf, group_sizes[g], 2);
        for (uint32_t i = 0; i < group_sizes[g]; i++) {
            ssize_t r = recv(groups[g][i], rbuf, sizeof(rbuf), MSG_DONTWAIT);
            if (r >= 0) {
                CHECK(at < 0 && (uint32_t)r == p.len, "datagram of %u bytes received twice or cut", p.len);
                at = (int)i;
            }
        }
    }
    CHECK(at >= 0, "the datagram never arrived");
    CHECK((uint32_t)at == want, "a %u-byte datagram went to socket %d of %u, want %u", p.len, at,
          group_sizes[g], want);
    free(p.buf);
    return 0;
}
