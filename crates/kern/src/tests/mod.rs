//! Unit tests of `kern` on the fake machine ([`crate::fake`]): the block
//! layer's queues, ccd's mapping, the bus_dma FIFO and the sd driver end to
//! end on a fake disk controller.

mod machine;
mod bufq;
mod ccd_map;
mod busdma_fifo;
mod sd;
