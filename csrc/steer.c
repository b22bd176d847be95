/* steer.c - ingress flow steering across the SO_REUSEPORT sockets of a multi-queue node: a
 * classic-BPF program that picks the socket from the INNER IPv4 flow of each datagram.
 * One setsockopt at start-up; nothing here runs per packet in user space.
 *
 * Without it the kernel picks a socket by the outer 4-tuple, and every datagram from one peer
 * (always from its port 8285) lands on one socket: one queue would do all the work for that
 * peer, and the inner flows' order would depend on nothing we control. */
#define _GNU_SOURCE
#include <sys/socket.h>
#include <linux/filter.h>

#include "internal.h"

#ifndef SO_ATTACH_REUSEPORT_CBPF
#define SO_ATTACH_REUSEPORT_CBPF 51
#endif

/* 2^32 / golden ratio: the multiply spreads every bit of the folded hash into bits 16..31,
 * which the modulo then reads.  Without it only the low bits count, and Linux gives connect()
 * even ports: four iperf3 streams all landed on one of two queues. */
#define STEER_MIX 0x9E3779B1u

/* The program sees the datagram from its UDP payload on: offset 0 is the inner IPv4 header.
 * A load past the end makes classic BPF return 0: such a datagram goes to socket 0. */
int fp_reuseport_steer(int udp_fd, uint32_t nsocks)
{
    if (nsocks < 1 || nsocks > FP_STEER_MAX_SOCKS)
        return -EINVAL;
    struct sock_filter prog[] = {
        /*  0 */ BPF_STMT(BPF_LD | BPF_W | BPF_ABS, IP_OFF_SRC),     /* A = source address */
        /*  1 */ BPF_STMT(BPF_MISC | BPF_TAX, 0),                    /* X = A */
        /*  2 */ BPF_STMT(BPF_LD | BPF_W | BPF_ABS, IP_OFF_DST),     /* A = destination address */
        /*  3 */ BPF_STMT(BPF_ALU | BPF_XOR | BPF_X, 0),             /* A ^= X */
        /*  4 */ BPF_STMT(BPF_ST, 0),                                /* M[0] = A */
        /*  5 */ BPF_STMT(BPF_LD | BPF_B | BPF_ABS, IP_OFF_PROTO),   /* A = protocol */
        /*  6 */ BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 6, 1, 0),       /* TCP: to 8 */
        /*  7 */ BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 17, 0, 7),      /* not UDP: to 15 */
        /*  8 */ BPF_STMT(BPF_LD | BPF_H | BPF_ABS, IP_OFF_FRAG),    /* A = flags + offset */
        /*  9 */ BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, IP_FRAG_BITS, 5, 0), /* a fragment: to 15 */
        /* 10 */ BPF_STMT(BPF_LDX | BPF_B | BPF_MSH, 0),             /* X = IHL * 4 */
        /* 11 */ BPF_STMT(BPF_LD | BPF_W | BPF_IND, 0),              /* A = both ports */
        /* 12 */ BPF_STMT(BPF_LDX | BPF_MEM, 0),                     /* X = M[0] */
        /* 13 */ BPF_STMT(BPF_ALU | BPF_XOR | BPF_X, 0),             /* A ^= X */
        /* 14 */ BPF_STMT(BPF_ST, 0),                                /* M[0] = A */
        /* 15 */ BPF_STMT(BPF_LD | BPF_MEM, 0),                      /* A = M[0] */
        /* 16 */ BPF_STMT(BPF_MISC | BPF_TAX, 0),                    /* X = A */
        /* 17 */ BPF_STMT(BPF_ALU | BPF_RSH | BPF_K, 16),            /* A >>= 16 */
        /* 18 */ BPF_STMT(BPF_ALU | BPF_XOR | BPF_X, 0),             /* A ^= X */
        /* 19 */ BPF_STMT(BPF_ALU | BPF_MUL | BPF_K, STEER_MIX),     /* A *= golden ratio */
        /* 20 */ BPF_STMT(BPF_ALU | BPF_RSH | BPF_K, 16),            /* A >>= 16 */
        /* 21 */ BPF_STMT(BPF_ALU | BPF_MOD | BPF_K, nsocks),        /* A %= nsocks */
        /* 22 */ BPF_STMT(BPF_RET | BPF_A, 0),
    };
    struct sock_fprog fprog = {.len = sizeof(prog) / sizeof(prog[0]), .filter = prog};
    if (setsockopt(udp_fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &fprog, sizeof(fprog)) < 0)
        return -errno;
    return 0;
}
