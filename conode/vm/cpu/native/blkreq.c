// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * cobd's hot path: a virtio-blk request's descriptor chain, and its data between guest RAM and host files.
 *
 * A 1 MiB request is a chain of 258 descriptors (a header, a buffer per 4 KiB page, the status byte); walking
 * it and moving its pages one by one in Python costs more than the guest's own work for it.  Here the chain is
 * walked with the same checks as conode/vm/devices/virtio/queue.py (every index inside the queue, no indirect
 * descriptor, every buffer inside RAM, at most 4 GiB in all, no loop: at most one step per queue entry) and cut
 * into the request's parts as conode/vm/devices/virtio/block.py does; buffers that follow each other in RAM
 * become one piece.  The device keeps every decision (the request's type, range, budget, status) in Python.
 *
 * Data moves without Python in between.  A read goes from the host files straight into guest RAM (preadv), and
 * then the engine is told which pages changed (conode's uc_conode_dma_written: translated code on them is
 * invalidated and the migration's dirty-page log marks them, as for a write through uc_mem_write); with an
 * engine that cannot be told (stock Unicorn), it goes through a scratch buffer and uc_mem_write.  Never a raw
 * write into RAM the engine does not hear of.  A write goes from guest RAM to the overlay file with pwritev
 * (reading RAM changes nothing the engine tracks).
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#define DESC_F_NEXT 1u
#define DESC_F_WRITE 2u
#define DESC_F_INDIRECT 4u
#define HEADER_BYTES 16u
#define MAX_CHAIN_BYTES 0xFFFFFFFFull
#define IOV_BATCH 1024

/* Why a chain broke the ring's rules (the queue stops); keep in step with block_native.py. */
enum {
    CHAIN_BAD_INDEX = -1,
    CHAIN_INDIRECT = -2,
    CHAIN_OUTSIDE_RAM = -3,
    CHAIN_TOO_LONG = -4,
    CHAIN_LOOPS = -5,
};

/* What the chain is, as a request; shared with Python through ctypes (block_native.py's BlkRequest). */
struct blk_request {
    uint64_t sector;
    uint64_t out_bytes;   /* bytes the driver gave after the header */
    uint64_t in_bytes;    /* bytes the device may write before the status byte */
    uint64_t status_at;   /* guest address of the status byte */
    uint64_t fault;       /* the index or address a broken chain names */
    uint64_t fault_len;   /* the length of the buffer outside RAM */
    uint32_t kind;        /* the header's request type */
    uint32_t n_out;       /* pieces of the bytes after the header */
    uint32_t n_in;        /* pieces of the bytes before the status byte */
    int32_t shape;        /* 0: a request; 1: not one, answer IOERR at status_at; 2: not one, no status byte */
};

/* Append [address, address+length) to the piece list, extending the last piece if it ends there. */
static void add_piece(uint64_t *pieces, uint32_t *count, uint64_t address, uint64_t length)
{
    if (length == 0)
        return;
    if (*count && pieces[2 * (*count - 1)] + pieces[2 * (*count - 1) + 1] == address) {
        pieces[2 * (*count - 1) + 1] += length;
        return;
    }
    pieces[2 * *count] = address;
    pieces[2 * *count + 1] = length;
    (*count)++;
}

/*
 * Walk the chain at *head* of the descriptor table at guest address *desc* (a queue of *qsize* entries, its
 * table inside RAM: the transport checked it) and describe it in *r*.  *out_pieces* and *in_pieces* hold room
 * for *qsize* (address, length) pairs each.  Returns 0, or a CHAIN_* code with r->fault set.
 */
int blk_parse(const uint8_t *ram, uint64_t ram_size, uint64_t desc, uint32_t qsize, uint32_t head,
              struct blk_request *r, uint64_t *out_pieces, uint64_t *in_pieces)
{
    uint8_t header[HEADER_BYTES];
    uint64_t total = 0, header_got = 0, last_w_addr = 0, last_w_len = 0;
    uint32_t index = head, steps, readable_after_writable = 0, writables = 0;

    memset(r, 0, sizeof(*r));
    for (steps = 0; steps < qsize; steps++) {
        const uint8_t *d;
        uint64_t address;
        uint32_t length;
        uint16_t flags, next;

        if (index >= qsize) {
            r->fault = index;
            return CHAIN_BAD_INDEX;
        }
        d = ram + desc + 16ull * index;
        memcpy(&address, d, 8);
        memcpy(&length, d + 8, 4);
        memcpy(&flags, d + 12, 2);
        memcpy(&next, d + 14, 2);
        if (flags & DESC_F_INDIRECT)
            return CHAIN_INDIRECT;
        if (address > ram_size || length > ram_size - address) {
            r->fault = address;
            r->fault_len = length;
            return CHAIN_OUTSIDE_RAM;
        }
        total += length;
        if (total > MAX_CHAIN_BYTES)
            return CHAIN_TOO_LONG;
        if (flags & DESC_F_WRITE) {
            /* every writable buffer but the last is data; the last is decided when the chain ends */
            if (writables)
                add_piece(in_pieces, &r->n_in, last_w_addr, last_w_len);
            last_w_addr = address;
            last_w_len = length;
            writables++;
        } else {
            uint64_t skip = 0;
            if (writables)
                readable_after_writable = 1;
            r->out_bytes += length;
            if (header_got < HEADER_BYTES) {
                skip = HEADER_BYTES - header_got < length ? HEADER_BYTES - header_got : length;
                memcpy(header + header_got, ram + address, skip);
                header_got += skip;
            }
            add_piece(out_pieces, &r->n_out, address + skip, length - skip);
        }
        if (!(flags & DESC_F_NEXT))
            break;
        index = next;
    }
    if (steps == qsize) {
        r->fault = qsize;
        return CHAIN_LOOPS;
    }
    if (!writables || readable_after_writable || last_w_len == 0) {
        /* no status byte, or a device-writable buffer before a device-readable one: not a request */
        r->shape = writables && last_w_len ? 1 : 2;
        r->status_at = last_w_addr + last_w_len - 1;
        return 0;
    }
    add_piece(in_pieces, &r->n_in, last_w_addr, last_w_len - 1);
    r->status_at = last_w_addr + last_w_len - 1;
    r->in_bytes = 0;
    for (uint32_t i = 0; i < r->n_in; i++)
        r->in_bytes += in_pieces[2 * i + 1];
    if (header_got < HEADER_BYTES) {
        r->shape = 1;  /* too short for a header: IOERR */
        return 0;
    }
    r->out_bytes -= HEADER_BYTES;
    memcpy(&r->kind, header, 4);
    memcpy(&r->sector, header + 8, 8);
    return 0;
}

typedef int (*dma_write_fn)(void *handle, uint64_t address, const void *bytes, uint64_t size);
typedef int (*dma_done_fn)(void *handle, uint64_t address, uint64_t size);

/* Fill *buffer* from *fd* at *offset*; what lies past the end of the file reads as zeros. 0 or -errno. */
static int read_full(int fd, uint8_t *buffer, uint64_t length, int64_t offset)
{
    uint64_t done = 0;
    while (done < length) {
        ssize_t got = pread(fd, buffer + done, length - done, offset + (int64_t)done);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (got == 0) {
            memset(buffer + done, 0, length - done);
            return 0;
        }
        done += (uint64_t)got;
    }
    return 0;
}

/* A position in a list of pieces: the piece, and the bytes of it already filled. */
struct cursor {
    const uint64_t *pieces;
    uint32_t count;
    uint32_t piece;
    uint64_t done;
};

/* Move the cursor *bytes* further (zeroing them in *ram* if it is given); -EFAULT if the pieces run out. */
static int advance(struct cursor *c, uint64_t bytes, uint8_t *ram)
{
    while (bytes) {
        uint64_t room, n;
        if (c->piece >= c->count)
            return -EFAULT;
        room = c->pieces[2 * c->piece + 1] - c->done;
        n = bytes < room ? bytes : room;
        if (ram)
            memset(ram + c->pieces[2 * c->piece] + c->done, 0, n);
        bytes -= n;
        c->done += n;
        if (c->done == c->pieces[2 * c->piece + 1]) {
            c->piece++;
            c->done = 0;
        }
    }
    return 0;
}

/* Read *length* bytes of *fd* at *at* straight into the RAM pieces from the cursor on (past the end of the
   file: zeros). 0 or -errno. */
static int read_direct(int fd, int64_t at, uint64_t length, uint8_t *ram, struct cursor *c)
{
    while (length) {
        struct iovec iov[IOV_BATCH];
        struct cursor plan = *c;
        uint64_t planned = 0;
        int count = 0, err;
        ssize_t got;

        while (count < IOV_BATCH && planned < length) {
            uint64_t room, take;
            if (plan.piece >= plan.count)
                return -EFAULT;
            room = plan.pieces[2 * plan.piece + 1] - plan.done;
            take = length - planned < room ? length - planned : room;
            iov[count].iov_base = ram + plan.pieces[2 * plan.piece] + plan.done;
            iov[count].iov_len = take;
            count++;
            planned += take;
            advance(&plan, take, NULL);
        }
        got = preadv(fd, iov, count, at);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        err = got == 0 ? advance(c, planned, ram) : advance(c, (uint64_t)got, NULL);
        if (err)
            return err;
        got = got == 0 ? (ssize_t)planned : got;
        at += got;
        length -= (uint64_t)got;
    }
    return 0;
}

/*
 * A read request's data: the host file extents (fds[i], offsets[i], lengths[i]), in order, into the guest RAM
 * *pieces* (inside [0, ram_size): checked again), in order; the extents and the pieces hold the same number of
 * bytes.  With *done* (the engine's uc_conode_dma_written), straight from the files into RAM, then *done* for
 * every piece — also when a read failed half way, for what it wrote; without it, through *scratch* and *write*
 * (uc_mem_write).  Returns 0, -errno for a host read error, or -EFAULT if the pieces run out or the DMA
 * functions refuse a piece.
 */
int blk_read(const int32_t *fds, const int64_t *offsets, const uint64_t *lengths, uint32_t extents,
             uint8_t *scratch, uint64_t scratch_len, uint8_t *ram, uint64_t ram_size, const uint64_t *pieces,
             uint32_t n_pieces, dma_write_fn write, dma_done_fn done, void *handle)
{
    struct cursor c = {pieces, n_pieces, 0, 0};
    int err = 0;

    for (uint32_t i = 0; i < n_pieces; i++)
        if (pieces[2 * i] > ram_size || pieces[2 * i + 1] > ram_size - pieces[2 * i])
            return -EFAULT;
    if (done) {
        for (uint32_t e = 0; e < extents && !err; e++)
            err = read_direct(fds[e], offsets[e], lengths[e], ram, &c);
        for (uint32_t i = 0; i < n_pieces; i++)
            if (done(handle, pieces[2 * i], pieces[2 * i + 1]) != 0 && !err)
                err = -EFAULT;
        return err;
    }
    for (uint32_t e = 0; e < extents; e++) {
        uint64_t left = lengths[e];
        int64_t at = offsets[e];
        while (left) {
            uint64_t take = left < scratch_len ? left : scratch_len, sent = 0;
            err = read_full(fds[e], scratch, take, at);
            if (err)
                return err;
            while (sent < take) {
                uint64_t room, n;
                if (c.piece >= c.count)
                    return -EFAULT;
                room = pieces[2 * c.piece + 1] - c.done;
                n = take - sent < room ? take - sent : room;
                if (write(handle, pieces[2 * c.piece] + c.done, scratch + sent, n) != 0)
                    return -EFAULT;
                sent += n;
                advance(&c, n, NULL);
            }
            left -= take;
            at += (int64_t)take;
        }
    }
    return 0;
}

/*
 * A write request's data: guest RAM *pieces* (each inside [0, ram_size): checked again), in order, to *fd* at
 * *offset*, with as few pwritev calls as the host allows.  Returns 0, -errno, or -EFAULT for a piece outside RAM.
 */
int blk_write(int fd, int64_t offset, const uint8_t *ram, uint64_t ram_size, const uint64_t *pieces,
              uint32_t n_pieces)
{
    struct iovec iov[IOV_BATCH];
    uint32_t next = 0;
    uint64_t skip = 0;  /* bytes of pieces[next] already written */

    for (uint32_t i = 0; i < n_pieces; i++)
        if (pieces[2 * i] > ram_size || pieces[2 * i + 1] > ram_size - pieces[2 * i])
            return -EFAULT;
    while (next < n_pieces) {
        int count = 0;
        ssize_t wrote;
        for (uint32_t i = next; i < n_pieces && count < IOV_BATCH; i++, count++) {
            uint64_t from = i == next ? skip : 0;
            iov[count].iov_base = (void *)(ram + pieces[2 * i] + from);
            iov[count].iov_len = pieces[2 * i + 1] - from;
        }
        wrote = pwritev(fd, iov, count, offset);
        if (wrote < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (wrote == 0)
            return -EIO;
        offset += wrote;
        while (next < n_pieces && (uint64_t)wrote >= pieces[2 * next + 1] - skip) {
            wrote -= (ssize_t)(pieces[2 * next + 1] - skip);
            skip = 0;
            next++;
        }
        skip += (uint64_t)wrote;
    }
    return 0;
}
